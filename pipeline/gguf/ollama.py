"""An Ollama Modelfile for an exported GGUF, and the check that its template renders the pipeline's prompts.

Ollama templates are Go text/template programs over `.Messages` (each with `.Role`, `.Content`); the model's
Hugging Face template is Jinja. The Go template is derived from what the Jinja template renders for chats of
marker strings: the text before the first user turn (with and without a system turn), between turns, and after
the last user turn (the generation prompt). A leading BOS is left to llama.cpp, which adds it where the GGUF
says so (as for any prompt Ollama tokenizes). The check renders the written Modelfile's TEMPLATE with Go's own
text/template (`go run ollama_template.go`) on the eval prompts and on chats of other shapes, and compares with
the Jinja rendering, character for character.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.errors import DataError
from pipeline.modeling.chat_template import render

GO_RENDERER = Path(__file__).with_name("ollama_template.go")
MARK = "\u2042{}\u2042"  # ⁂X⁂: text no chat template alters
S, U, X, V = (MARK.format(name) for name in "SUXV")


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise DataError(f"the chat template does not render {what} once, in order; no Ollama template can be derived")
    left, right = text.split(marker)
    return left, right


def _literal(text: str) -> str:
    """Text a Go template prints as is ("{{" is the only thing to escape)."""
    return text.replace("{{", '{{ "{{" }}')


def derive_template(tokenizer, bos_text: str = "") -> str:
    """The Go template that renders every chat [system?, user, (assistant, user)*] as the Jinja template does,
    minus bos_text at the start (llama.cpp adds BOS itself when the GGUF says add_bos)."""

    def chat(*turns, generation=True) -> str:
        text = render(tokenizer, [{"role": r, "content": c} for r, c in turns], generation_prompt=generation)
        return text.removeprefix(bos_text) if bos_text else text

    plain, end = _split(chat(("user", U)), U, "a user turn")
    with_system = chat(("system", S), ("user", U))
    system_start, rest = _split(with_system, S, "a system turn")
    system_end, end_with_system = _split(rest, U, "the user turn after a system turn")
    if end_with_system != end:
        raise DataError("the chat template ends a chat differently with a system turn; no Ollama template derived")
    turns = chat(("user", U), ("assistant", X), ("user", V))
    _, after_user = _split(turns, U, "the first user turn")
    user_to_assistant, after_assistant = _split(after_user, X, "an assistant turn")
    assistant_to_user, last = _split(after_assistant, V, "the second user turn")
    if last != end:
        raise DataError("the chat template ends a multi-turn chat differently; no Ollama template derived")
    return ('{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
            f'{{{{ if $system }}}}{_literal(system_start)}{{{{ $system }}}}{_literal(system_end)}'
            f'{{{{ else }}}}{_literal(plain)}{{{{ end }}}}'
            '{{ $previous := "" }}{{ range .Messages }}'
            f'{{{{ if eq .Role "user" }}}}{{{{ if eq $previous "assistant" }}}}{_literal(assistant_to_user)}{{{{ end }}}}'
            '{{ .Content }}{{ $previous = "user" }}'
            f'{{{{ else if eq .Role "assistant" }}}}{_literal(user_to_assistant)}{{{{ .Content }}}}'
            '{{ $previous = "assistant" }}{{ end }}{{ end }}'
            f'{_literal(end)}')


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise DataError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, template: str, system_prompt: str | None, stop_texts: list[str],
              num_ctx: int) -> str:
    """The Modelfile: the GGUF beside it, the template, the task's system prompt, the stop tokens, greedy decoding
    (as the pipeline generates)."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(template, 'template')}"]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt, 'system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(text, ensure_ascii=False)}" for text in stop_texts]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def modelfile_template(text: str) -> str:
    """The TEMPLATE of a Modelfile's text."""
    match = re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M)
    if not match:
        raise DataError("the Modelfile has no TEMPLATE \"\"\"...\"\"\" block")
    return match.group(1)


def go_render(template: str, chats: list[list[dict]]) -> list[str]:
    """Each chat rendered by Go's text/template (Ollama's engine) with the template."""
    go = shutil.which("go")
    if go is None:
        raise DataError("the Modelfile check needs Go (its text/template is Ollama's template engine): install it "
                        "(Debian: apt-get install golang-go; `make install-export` does as root)")
    cases = [{"template": template, "system": "", "messages": chat} for chat in chats]
    with tempfile.TemporaryDirectory() as scratch:  # build cache and GOPATH where HOME gives none
        env = {"GOCACHE": f"{scratch}/cache", "GOPATH": f"{scratch}/go"} if "HOME" not in os.environ else {}
        done = subprocess.run([go, "run", str(GO_RENDERER)], input=json.dumps(cases), env={**os.environ, **env}, capture_output=True,
                              text=True)
    if done.returncode != 0:
        raise DataError(f"the Modelfile's template does not render in Go's text/template: {done.stderr.strip()[-1000:]}")
    return json.loads(done.stdout)


def check_template(modelfile_text: str, tokenizer, chats: list[list[dict]], bos_text: str) -> dict:
    """Render chats with the Modelfile's TEMPLATE in Go and with the Jinja template; every one must be the same
    text (the Jinja one without the leading BOS llama.cpp adds). Returns {"chats": n, "identical": n}."""
    template = modelfile_template(modelfile_text)
    expected = [render(tokenizer, chat, generation_prompt=True) for chat in chats]
    expected = [text.removeprefix(bos_text) if bos_text else text for text in expected]
    got = go_render(template, chats)
    same = sum(a == b for a, b in zip(got, expected, strict=True))
    if same != len(chats):
        first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        raise DataError(f"the Modelfile's template renders chat {first} differently from the model's chat template:\n"
                        f"  Go:    {got[first]!r}\n  Jinja: {expected[first]!r}")
    return {"chats": len(chats), "identical": same}
