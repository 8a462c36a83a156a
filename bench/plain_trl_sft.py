"""The baseline of bench/sft_bench.py: the textbook TRL QLoRA recipe, nothing of the pipeline.

A conversational `messages` dataset, `assistant_only_loss=True` (the tiny base's template has
`{% generation %}` markers), a bnb nf4 model, a LoRA config, SFTTrainer. The settings (batch size,
max_length, lr, steps, seed, LoRA r/alpha/targets, quantization) come as JSON from sft_bench.py,
which reads them from params.yaml's `sft` section, so both sides train with the same values.
Throughput is counted by bench/throughput.py, the same callback the pipeline side uses.

  python bench/plain_trl_sft.py MODEL_DIR DATA.jsonl SETTINGS.json OUT_DIR RESULT.json
"""

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from throughput import Throughput

model_dir, data_file, settings_file, out_dir, result_file = sys.argv[1:6]
s = json.loads(open(settings_file, encoding="utf-8").read())
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s["compute_dtype"]]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type=s["quantization"], bnb_4bit_use_double_quant=s["double_quant"],
    bnb_4bit_compute_dtype=dtype))
dataset = Dataset.from_list([json.loads(line) for line in open(data_file, encoding="utf-8")])  # {"messages": [...]}
config = SFTConfig(
    output_dir=out_dir, max_steps=s["max_steps"], per_device_train_batch_size=s["batch_size"],
    gradient_accumulation_steps=s["gradient_accumulation_steps"], learning_rate=s["learning_rate"],
    lr_scheduler_type=s["lr_scheduler"], warmup_steps=s["warmup_ratio"], max_length=s["max_length"],
    packing=s["packing"], packing_strategy=s["packing_strategy"], assistant_only_loss=True,
    gradient_checkpointing=s["gradient_checkpointing"],  # TRL's default is True; the pipeline's is false
    bf16=dtype == torch.bfloat16,  # TRL's default is True
    use_cpu=not torch.cuda.is_available(), logging_steps=s["logging_steps"], save_strategy="no",
    report_to="none", seed=s["seed"], data_seed=s["seed"], include_num_input_tokens_seen="non_padding")
peft_config = LoraConfig(r=s["lora"]["r"], lora_alpha=s["lora"]["alpha"], lora_dropout=s["lora"]["dropout"],
                         target_modules=s["lora"]["target_modules"], bias="none", task_type="CAUSAL_LM")
meter = Throughput(warmup=s["warmup_skip"], budget_s=s["budget_s"])
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config, callbacks=[meter])
if s.get("adapter_fp32"):  # variant: undo TRL's bf16 cast of a quantized model's adapter (the pipeline does this)
    for p in (p for p in trainer.model.parameters() if p.requires_grad):
        p.data = p.data.float()
trainer.train()
result = meter.result() | {"trainer_num_input_tokens_seen": trainer.state.num_input_tokens_seen}
open(result_file, "w", encoding="utf-8").write(json.dumps(result, indent=2))
print(json.dumps(result))
