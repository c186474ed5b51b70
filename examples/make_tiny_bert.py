"""Make ``tiny-bert/`` and ``reviews.jsonl``: a Hugging Face model folder and text to prune it on.

    python examples/make_tiny_bert.py [FOLDER]

Nothing is downloaded. The sentences are made up from two small word lists ("the film was
great", "a cold grim day"); label 1 means the sentence holds good words. A word-level tokenizer
is built over those words with the ``tokenizers`` library, and a tiny BERT classifier (hidden
size 32, 2 layers, 4 heads) is trained on 512 sentences for 4 epochs, then saved with
``save_pretrained`` together with its tokenizer into ``FOLDER/tiny-bert`` (default: next to this
script). ``FOLDER/reviews.jsonl`` holds 320 other sentences, for ``tiny_bert.toml``.
Deterministic (seed 0, CPU), a few seconds.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

GOOD = ["good", "great", "fine", "happy", "bright", "warm", "lovely", "nice"]
BAD = ["bad", "poor", "sad", "dark", "cold", "grim", "awful", "dull"]
NOUNS = ["cat", "dog", "day", "film", "song", "park", "book", "meal", "trip", "game"]
FILL = ["the", "a", "was", "is", "very", "quite", "and", "this", "that", "so", "it", "felt"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(count: int, seed: int) -> list[dict]:
    """``count`` records ``{"text", "label"}``, half of each label, seeded."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        label = i % 2
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 6))] + [rng.choice(NOUNS)]
        words += [rng.choice(GOOD if label else BAD) for _ in range(rng.randint(1, 2))]
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the word lists, adding [CLS] ... [SEP] like BERT's."""
    vocab = {w: i for i, w in enumerate(SPECIAL + GOOD + BAD + NOUNS + FILL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def main(folder: Path) -> None:
    torch.manual_seed(0)
    tok = tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    model = transformers.BertForSequenceClassification(config)
    train = sentences(512, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(4):
        random.Random(0).shuffle(train)
        for i in range(0, len(train), 32):
            batch = train[i:i + 32]
            inputs = tok([r["text"] for r in batch], padding=True, return_tensors="pt")
            labels = torch.tensor([r["label"] for r in batch])
            optimizer.zero_grad()
            F.cross_entropy(model(**inputs).logits, labels).backward()
            optimizer.step()
    transformers.utils.logging.disable_progress_bar()
    model.eval().save_pretrained(folder / "tiny-bert")
    tok.save_pretrained(folder / "tiny-bert")
    data = folder / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentences(320, seed=2)), "utf-8")
    print(f"wrote {folder / 'tiny-bert'} and {data}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
