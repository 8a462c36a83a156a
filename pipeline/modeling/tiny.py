"""The built-in tiny base: a byte-level BPE tokenizer, a Llama-3-style chat template and a random-init Llama.

The tokenizer is trained on the shipped text (Hangul included, via bytes); the chat template's assistant
turns carry `{% generation %}` markers; the weights come from a config and a fixed seed, drawn with
numpy's platform-independent generator, so they are the same bytes on every CPU. Saved as an ordinary
Hugging Face directory (safetensors). The `base` stage (pipeline/stages/build_base.py) calls it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params, TinyModelParams
from pipeline.data.formats import to_example
from pipeline.data.readers import read_records
from pipeline.modeling.loading import save_atomically

BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]

# Llama 3 layout (as in the seed documents), with generation markers for assistant-only loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{ message['content'] }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits stand alone (as in Llama 3 / Qwen tokenizers): "정답은 3번" and the answer "3" share one
    # token, so answering is copying, which a small model learns quickly.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any UTF-8 text encodes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def init_weights(model, seed: int) -> None:
    """Overwrite every parameter with values drawn by numpy's PCG64 generator, in sorted name order.

    torch's own init kernels (normal_ under torch.manual_seed) are vectorised per CPU generation: the same
    seed gave different weights on AVX2 and AVX-512 machines. numpy's Generator draws the same stream on
    every platform, so models/base is the same bytes everywhere. The distribution is Llama's
    `_init_weights`: normal(0, initializer_range) for Linear and Embedding weights (the padding row zero),
    zero biases, RMSNorm weights one. The tied lm_head is the embedding tensor: named_parameters() lists
    it once, so it is drawn once and stays tied.
    """
    import numpy as np
    import torch

    rng = np.random.Generator(np.random.PCG64(seed))
    std = model.config.initializer_range
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            module = model.get_submodule(name.rpartition(".")[0])
            if name.endswith(".bias"):
                values = np.zeros(param.shape)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                values = rng.normal(0.0, std, size=param.shape)
                if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                    values[module.padding_idx] = 0.0
            elif "RMSNorm" in type(module).__name__:
                values = np.ones(param.shape)
            else:  # a module this init does not know would keep torch's machine-dependent init
                raise TypeError(f"{name}: no machine-independent init for {type(module).__name__}")
            param.copy_(torch.from_numpy(values.astype(np.float32)))


def build_tiny_model(tokenizer, tiny: TinyModelParams, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def build_tiny_base(texts: list[str], tiny: TinyModelParams, seed: int, out_dir: Path) -> None:
    """Train the tokenizer, init the model and save both, atomically, to out_dir."""
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    model = build_tiny_model(tokenizer, tiny, seed)
    save_atomically(out_dir, model, tokenizer)


def tokenizer_texts(params: Params) -> list[str]:
    """What the tokenizer learns from: the shipped text (the sample data, whatever `data` points at), i.e.
    the rendered training chats and the domain corpus, read with the `validate.max_record_bytes` limit."""
    shipped, limit = Path(params.sample_data.out_dir), params.validation.max_record_bytes
    texts = ["\n".join(m["content"] for m in to_example(record, "mcq", params.task).messages)
             for record in read_records(shipped / "train.jsonl", max_record_bytes=limit)]
    return texts + [record.value["text"]
                    for record in read_records(shipped / "domain_train.txt", max_record_bytes=limit)]
