"""The reference side of the tests where transformers 4.57 (the newest for torch 2.5) and 5.x
differ."""
import os

import gguf
import transformers

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def gguf_tokenizer(path):
    """transformers' tokenizer for the GGUF file ``path``. transformers < 5 never reads the
    file's ``tokenizer.ggml.add_bos_token`` (its LlamaTokenizerFast then adds BOS by default;
    5.x honours the flag), so there it is passed the file's value."""
    kw = {}
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    if not TRANSFORMERS_5 and field is not None:
        kw["add_bos_token"] = bool(field.contents())
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path), **kw)


def gguf_decode_strips_space(path) -> bool:
    """Whether transformers' tokenizer for the GGUF file ``path`` decodes with one leading space
    stripped: transformers < 5 adds that step unless the file sets
    ``tokenizer.ggml.add_space_prefix`` false (5.x and llama.cpp never strip for a byte-level
    BPE vocabulary)."""
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.add_space_prefix")
    return not TRANSFORMERS_5 and (field is None or bool(field.contents()))
