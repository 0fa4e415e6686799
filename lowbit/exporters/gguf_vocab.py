"""The tokenizer's GGUF key/values (vocabulary, merges, special ids, chat template).

Copied from the source GGUF when the model came from one, otherwise built from the Hugging Face
tokenizer files with gguf-py's vocab helpers.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError


def source_gguf(source: dict | None) -> Path | None:
    """The GGUF file a model came from (bundled or .gguf source), if it still exists. Callers pass the
    source of a model loaded in this process; an artifact's recorded source is not followed outside
    its folder (lowbit.api.export drops it), except a bundled model verified by its sha256."""
    from lowbit.model import sources

    if not source:
        return None
    try:
        if source.get("kind") == "bundled" and source.get("name") in sources.BUNDLED:
            path = sources.gguf_path(sources.ModelSource("bundled", Path(source["name"]), source["name"]))
            # only the installed package's own file, and only if it is the one the model came from
            return path if sources.sha256_memo([path]) == source.get("sha256") else None
        if source.get("kind") == "gguf" and Path(str(source.get("path"))).is_file():
            return Path(source["path"])
    except (LowbitError, OSError):
        return None
    return None


def add_tokenizer_kvs(writer, gguf_src: Path | None, folder: Path | None, n_vocab: int, notes: list[str]) -> None:
    """Add every tokenizer.* key to writer, from gguf_src if given, else from folder's tokenizer.json;
    the choice made goes into notes."""
    import gguf

    if gguf_src is not None:
        reader = gguf.GGUFReader(str(gguf_src))
        for key, f in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), vtype, sub)
        notes.append(f"tokenizer and chat template copied from {gguf_src.name}")
        return
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise LowbitError(f"GGUF export: no tokenizer.json in {folder} and no source GGUF to copy the vocabulary from; "
                          f"fix: save the tokenizer files into the artifact folder")
    vocab = gguf.vocab.BpeVocab(folder)
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padding), as llama.cpp's converter does
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    notes.append("tokenizer built from tokenizer.json with pre-tokenizer 'default' (llama.cpp may split text "
                  "slightly differently from transformers for some scripts)")
