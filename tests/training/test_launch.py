"""Multi-GPU launch files and model placement: each shipped accelerate config loads through accelerate's own
loader with the intended distributed type and only keys `accelerate launch` knows (a misspelt nested key is
otherwise ignored without a word), and `device_map` puts the weights where each launcher needs them. The DDP
file's real launch (two gloo processes) is tests/stages/test_sft.py::test_two_gloo_processes_train_data_parallel."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.modeling.loading import device_map

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize(("name", "distributed_type"), [
    ("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("deepspeed-zero3.yaml", "DEEPSPEED")])
def test_each_accelerate_config_loads_with_its_distributed_type(name, distributed_type):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(CONFIGS / name))  # raises on a top-level key accelerate does not know
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == 2 and config.num_machines == 1
    assert config.mixed_precision == "no" and not config.use_cpu  # the stage picks its dtype and device
    # `accelerate launch` copies fsdp_config.x to its option fsdp_x and deepspeed_config.x to x, whatever x is
    options = set(vars(launch_command_parser().parse_args(["script.py"])))
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    assert not [k for k in nested if k not in options], f"{name}: unknown to accelerate launch"
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is False  # peft: the memory saving of LoRA under FSDP
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3
        # the trainer fills these from sft.*; set here too, DeepSpeed refuses any mismatch
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(config.deepspeed_config)


@pytest.mark.parametrize(("env", "cuda", "expected"), [
    ({}, False, None),  # CPU: no device_map at all
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, None),  # gloo processes on the CPU
    ({}, True, "auto"),  # one process: spread over the visible GPUs
    ({"WORLD_SIZE": "1"}, True, "auto"),
    ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}, True, {"": 0}),  # torchrun / accelerate launch (DDP)
    ({"LOCAL_RANK": "3", "RANK": "7", "WORLD_SIZE": "8"}, True, {"": 3}),  # second machine: the local GPU, not RANK
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, True, {"": 0}),  # a launcher with one process
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, True, None),  # FSDP shards
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true",
      "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True, None),  # ZeRO-3 partitions
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, True, None),  # stage unknown
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true",
      "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, True, {"": 1}),  # ZeRO-2 keeps whole weights per GPU
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "false"}, True, {"": 1}),
])
def test_device_map_per_launcher(env, cuda, expected):
    assert device_map(env, cuda=cuda) == expected


def test_device_map_reads_the_process_environment(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert device_map(cuda=True) == "auto"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device_map(cuda=True) == {"": 1}
    assert device_map(cuda=False) is None
