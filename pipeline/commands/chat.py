"""Interactive chat with a registered adapter: `python -m pipeline.commands.chat --model-uri models:/<name>@champion`.

Loads base + adapter from the registry exactly as `predict` does (refusing a changed base or a chat
template other than the one the adapter was trained with), keeps the conversation, renders it with the
adapter's chat template, and streams the reply token by token until a stop token (EOS or the model's
end-of-turn id) or `--max-new-tokens`. One user message per line on stdin; an empty line or EOF ends.
"""

from __future__ import annotations

import sys

from pipeline.cli import cli_parser, run_cli
from pipeline.config import load_params
from pipeline.tracking import configure


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.chat")
    parser.add_argument("--model-uri", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--system", default=None, help="system prompt (default: params task.system_prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    import torch
    from transformers import TextStreamer

    from pipeline.modeling.chat_template import render, stop_token_ids
    from pipeline.modeling.loading import device_of
    from pipeline.registry.read import load_registered, version_task

    params = load_params()
    configure(params)
    model, tokenizer, version, base, revision = load_registered(args.model_uri)
    # The base's generation_config: EOS and end-of-turn ids (the same rule the evaluate stage uses).
    stops = sorted(stop_token_ids(base, tokenizer, revision))
    task = version_task(version) or params.task  # the prompt the adapter was trained with
    history = [{"role": "system", "content": args.system or task.system_prompt}]
    interactive = sys.stdin.isatty()
    print(f"chat with models:/{version.name}/{version.version} (empty line or Ctrl-D ends)", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line.strip():
            break
        history.append({"role": "user", "content": line.rstrip("\n").replace("\\n", "\n")})
        prompt = render(tokenizer, history, generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device_of(model))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        reply = out[0, inputs["input_ids"].shape[1]:].tolist()
        stopped = any(t in stops for t in reply)
        end = next((i for i, t in enumerate(reply) if t in stops), len(reply))
        history.append({"role": "assistant", "content": tokenizer.decode(reply[:end], skip_special_tokens=True)})
        if not stopped:
            print(f"[no stop token within {args.max_new_tokens} tokens]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
