"""Offline tiny causal LMs whose tokenizers carry the real chat templates and special tokens of common families.

`build_tiny_chat_model(family, out_dir)` writes an ordinary Hugging Face model directory: a fast byte-level
BPE tokenizer (trained here on `CORPUS`, so any text round-trips and offsets are available), the family's
real chat template (the byte-identical file from `assets/chat_templates/`, see `SOURCES.md` there), the
family's real special tokens as single added tokens, bos/eos/pad set the way the real instruct checkpoint
sets them, and a tiny random-init `LlamaForCausalLM` with a `generation_config.json` whose stop ids follow
the real checkpoint. Nothing is downloaded; the same seed gives byte-identical files.

Token ids are those of the tiny vocab, not the real ones: the relations hold (e.g. Gemma-3-it's
generation_config stops at both `<eos>` and `<end_of_turn>`), the numbers mostly do not. The low ids of the
SentencePiece families are kept: Gemma's <pad> <eos> <bos> <unk> <mask> are 0..4, Mistral's <unk> .. [/TOOL_RESULTS]
are 0..9 and OpenHermes' <unk> <s> </s> are 0..2, as in the real vocabs.

The real values relied on, from the checkpoints' tokenizer_config.json / config.json / generation_config.json
(recalled from the Hugging Face repos, which cannot be reached from here):

meta-llama/Llama-3.1-8B-Instruct
    added tokens 128000.. : <|begin_of_text|> <|end_of_text|> <|reserved_special_token_0|>
        <|reserved_special_token_1|> <|finetune_right_pad_id|> <|reserved_special_token_2|>
        <|start_header_id|> <|end_header_id|> <|eom_id|> <|eot_id|> <|python_tag|> (all special)
    tokenizer: bos <|begin_of_text|>, eos <|eot_id|>, no pad; tokenizer.json's post-processor prepends
        <|begin_of_text|> (there is no add_bos_token key), and the template writes bos_token itself
    config.json / generation_config.json: bos_token_id 128000, eos_token_id [128001, 128008, 128009]
        (<|end_of_text|>, <|eom_id|>, <|eot_id|>), no pad_token_id; tie_word_embeddings false
Qwen/Qwen2.5-7B-Instruct
    added tokens 151643.. : <|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|>
        <|box_start|> <|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|>
        <|vision_pad|> <|image_pad|> <|video_pad|> (special; all but <|endoftext|> listed as
        additional_special_tokens), then <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|>
        <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> (special: false)
    tokenizer: bos null, eos <|im_end|>, pad <|endoftext|>; no bos is prepended
    config.json: bos_token_id 151643, eos_token_id 151645; generation_config.json: bos_token_id 151643,
        pad_token_id 151643, eos_token_id [151645, 151643] (<|im_end|>, <|endoftext|>)
Qwen/Qwen3-8B
    as Qwen2.5, plus 151665.. <tool_response> </tool_response> <think> </think> (special: false)
    tokenizer: bos null, eos <|im_end|>, pad <|endoftext|>
    config.json: bos_token_id 151643, eos_token_id 151645; generation_config.json: bos_token_id 151643,
        pad_token_id 151643, eos_token_id [151645, 151643]
google/gemma-3-1b-it (and -4b-it etc.)
    ids 0..4: <pad> <eos> <bos> <unk> <mask>; 105 <start_of_turn>, 106 <end_of_turn>; 255999
        <start_of_image>, 256000 <end_of_image>, 262144 <image_soft_token> (special)
    tokenizer: bos <bos>, eos <eos>, pad <pad>, unk <unk>, add_bos_token true, add_eos_token false
        (and the template writes bos_token itself)
    config / generation_config.json: bos_token_id 2, eos_token_id [1, 106] (<eos>, <end_of_turn>),
        pad_token_id 0; tie_word_embeddings true
mistralai/Mistral-7B-Instruct-v0.3
    ids 0..9: <unk> <s> </s> [INST] [/INST] [TOOL_CALLS] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS]
        [TOOL_RESULTS] [/TOOL_RESULTS] (then [control_8].. up to 767, not reproduced)
    tokenizer: bos <s>, eos </s>, unk <unk>, no pad, add_bos_token true, add_eos_token false
    config / generation_config.json: bos_token_id 1, eos_token_id 2, no pad; tie_word_embeddings false
teknium/OpenHermes-2.5-Mistral-7B (the ChatML family)
    ids 0..2: <unk> <s> </s>; 32000 <|im_end|>, 32001 <|im_start|>
    tokenizer: bos <s>, eos <|im_end|>, unk <unk>, no pad, add_bos_token true (the template itself
        writes no bos)
    config / generation_config.json: bos_token_id 1, eos_token_id 32000 (<|im_end|>)

Where the real tokenizer prepends bos (add_bos_token true, or Llama 3's post-processor), the fixture's
tokenizer.json has a TemplateProcessing post-processor that prepends it. transformers 5 drops
add_bos_token/add_eos_token from tokenizer_config.json when a tokenizer.json exists (and does not save them),
so `tokenizer.add_bos_token` reads False on these fixtures: the post-processor is what counts.

Sampling defaults of the real generation configs (temperature, top_p, ...) are deliberately left out so
that generation with these fixtures stays greedy and deterministic. `model_max_length` is the tiny model's
context (MAX_POSITIONS), not the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"

FAMILIES = ("llama3_1", "qwen2_5", "qwen3", "gemma3", "mistral", "chatml")

# Tiny model shape (LlamaForCausalLM: plain nn.Linear projections).
HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 1, 2, 128, 2048
BPE_VOCAB = 640  # the trained part (256 byte symbols + merges); added tokens come on top

# Built-in training text for the BPE: Korean (Hangul), English, digits, punctuation, plus the words the
# templates write around the special tokens. Byte-level BPE encodes any other text too.
CORPUS = (
    "지문을 읽고 질문의 답을 구하세요.",
    "지문: 철수는 사과 3개와 배 2개를 샀다. 질문: 철수가 산 과일은 모두 몇 개인가?",
    "정답은 5번입니다. 답: 5",
    "다음 중 옳은 것을 고르시오. 1) 서울 2) 부산 3) 대구 4) 광주",
    "대한민국의 수도는 서울이며, 인구는 약 9,400,000명이다!",
    "한국어 문장은 띄어쓰기와 조사(은/는/이/가/을/를)를 씁니다; 예: \"나는 학교에 간다.\"",
    "오늘 날씨는 맑고 기온은 23.5도입니다. 내일은 비가 올까요?",
    "회의는 2024년 7월 26일 오후 3시 30분에 시작합니다 (장소: 제2회의실).",
    "Read the passage and answer the question.",
    "Passage: Alice bought 3 apples and 2 pears. Question: How many fruits did Alice buy?",
    "The answer is 5. Answer: 5",
    "You are a helpful assistant. Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "system user assistant model tool ipython: roles of a chat, one turn after another.",
    "Hello, world! How are you? I'm fine -- thanks; and you...",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000 50% #1 @home $5 & more.",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * ^ ~ ` # @ $ % &",
    "JSON: {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Seoul\"}}",
    "Line one\nLine two\n\nA new paragraph\tafter a tab.",
)


@dataclass(frozen=True)
class Family:
    real_model: str
    leading: tuple[str, ...]  # special tokens trained in first, at ids 0.. (SentencePiece-style vocabs)
    trailing: tuple[tuple[str, bool], ...]  # (token, special) added after the BPE vocab, in the real order
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    add_bos: bool  # the tokenizer prepends bos on encode(add_special_tokens=True)
    extra_special: tuple[str, ...]  # the real additional_special_tokens
    config_eos: tuple[str, ...]  # config.json eos_token_id
    config_pad: str | None
    gen_bos: str | None  # generation_config.json
    gen_eos: tuple[str, ...]
    gen_pad: str | None
    tie_word_embeddings: bool

    @property
    def all_tokens(self) -> tuple[str, ...]:
        return self.leading + tuple(t for t, _ in self.trailing)


def _special(*tokens: str) -> tuple[tuple[str, bool], ...]:
    return tuple((t, True) for t in tokens)


def _plain(*tokens: str) -> tuple[tuple[str, bool], ...]:
    return tuple((t, False) for t in tokens)


_QWEN_EXTRA = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN2_5_TRAILING = _special("<|endoftext|>", *_QWEN_EXTRA) + _plain(
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)


def _qwen(real_model: str, trailing: tuple[tuple[str, bool], ...]) -> Family:
    return Family(
        real_model=real_model, leading=(), trailing=trailing, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        unk=None, add_bos=False, extra_special=_QWEN_EXTRA, config_eos=("<|im_end|>",), config_pad=None,
        gen_bos="<|endoftext|>", gen_eos=("<|im_end|>", "<|endoftext|>"), gen_pad="<|endoftext|>",
        tie_word_embeddings=False,
    )


SPECS: dict[str, Family] = {
    "llama3_1": Family(
        real_model="meta-llama/Llama-3.1-8B-Instruct",
        leading=(),
        trailing=_special(
            "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
        ),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, add_bos=True,
        extra_special=(), config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), config_pad=None,
        gen_bos="<|begin_of_text|>", gen_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), gen_pad=None,
        tie_word_embeddings=False,
    ),
    "qwen2_5": _qwen("Qwen/Qwen2.5-7B-Instruct", _QWEN2_5_TRAILING),
    "qwen3": _qwen(
        "Qwen/Qwen3-8B", _QWEN2_5_TRAILING + _plain("<tool_response>", "</tool_response>", "<think>", "</think>")
    ),
    "gemma3": Family(
        real_model="google/gemma-3-1b-it",
        leading=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        trailing=_special("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True, extra_special=(),
        config_eos=("<eos>", "<end_of_turn>"), config_pad="<pad>",
        gen_bos="<bos>", gen_eos=("<eos>", "<end_of_turn>"), gen_pad="<pad>", tie_word_embeddings=True,
    ),
    "mistral": Family(
        real_model="mistralai/Mistral-7B-Instruct-v0.3",
        leading=(
            "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
        ),
        trailing=(),
        bos="<s>", eos="</s>", pad=None, unk="<unk>", add_bos=True, extra_special=(),
        config_eos=("</s>",), config_pad=None, gen_bos="<s>", gen_eos=("</s>",), gen_pad=None,
        tie_word_embeddings=False,
    ),
    "chatml": Family(
        real_model="teknium/OpenHermes-2.5-Mistral-7B",
        leading=("<unk>", "<s>", "</s>"),
        trailing=_special("<|im_end|>", "<|im_start|>"),
        bos="<s>", eos="<|im_end|>", pad=None, unk="<unk>", add_bos=True, extra_special=(),
        config_eos=("<|im_end|>",), config_pad=None, gen_bos="<s>", gen_eos=("<|im_end|>",), gen_pad=None,
        tie_word_embeddings=False,
    ),
}


def template_path(family: str) -> Path:
    return TEMPLATES_DIR / f"{family}.jinja"


def read_template(family: str) -> str:
    # newline="" keeps the file's bytes as they are (no newline translation)
    with open(template_path(family), encoding="utf-8", newline="") as f:
        return f.read()


def _spec(family: str) -> Family:
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return SPECS[family]


def build_tokenizer(family: str):
    """The family's fast tokenizer (transformers PreTrainedTokenizerFast), trained offline on CORPUS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _spec(family)
    tok = Tokenizer(models.BPE())
    # Digits stand alone (as in Qwen's pre-tokenizer), then GPT-2 style byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(spec.leading) + BPE_VOCAB,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec.leading],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 text encodes
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    for token, special in spec.trailing:  # one by one, so the ids follow the real order
        added = AddedToken(token, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos}:0 $A:0", pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
            special_tokens=[(spec.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs = {
        "tokenizer_object": tok, "bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad,
        "unk_token": spec.unk, "chat_template": read_template(family), "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }
    if spec.extra_special:
        kwargs["extra_special_tokens"] = list(spec.extra_special)
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    missing = [t for t in spec.all_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
               and t != spec.unk]
    if missing:
        raise RuntimeError(f"{family}: special tokens not in the vocab: {missing}")
    return tokenizer


def _ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _one_or_list(ids: list[int]) -> int | list[int]:
    return ids[0] if len(ids) == 1 else ids


def build_model(family: str, tokenizer, seed: int = 0):
    """A tiny random-init LlamaForCausalLM sized to the tokenizer, with the family's config/generation ids."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = _spec(family)
    tid = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tid(spec.gen_bos) if spec.gen_bos else None,  # config.json's bos is generation_config's
        eos_token_id=_one_or_list(_ids(tokenizer, spec.config_eos)),
        pad_token_id=tid(spec.config_pad) if spec.config_pad else None,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tid(spec.gen_bos) if spec.gen_bos else None,
        eos_token_id=_one_or_list(_ids(tokenizer, spec.gen_eos)),
        pad_token_id=tid(spec.gen_pad) if spec.gen_pad else None,
    )
    return model


def build_tiny_chat_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the family's tokenizer (+ chat template), tiny model and generation_config.json to out_dir."""
    _spec(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer, seed)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
