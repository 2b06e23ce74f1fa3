"""Writes the small JSON-lines corpora of the golden datasets (deterministic, no input).

corpus.jsonl: documents that stress GPT-2's pre-tokenizer pattern (contractions, letters,
numbers, punctuation, whitespace runs, non-ASCII scripts, emoji, `<|endoftext|>` written in
the text) with a `title` key too; edge.jsonl: some of those documents plus empty and
whitespace-only ones; sentences.jsonl: lists of sentences (Megatron-Core's sentence-split
input) among strings. `python3 make_corpus.py DIR [--pad-vocab TOKDIR]`: with --pad-vocab,
also writes DIR/vocab-65500.json, TOKDIR/vocab.json padded with unused `<|pad_N|>` entries to
65,500 (the size from which Megatron stores ids as int32).
"""
import json
import random
import sys

PIECES = [
    "It's", "don't", "I'll", "we've", "they're", "I'm", "he'd", "IT'S", "O'Brien's",
    "Hello", "world", "naïve", "café", "Straße", "ﬁne", "Ωmega", "über",
    "中文字符", "日本語のテキスト", "한국어", "Ελληνικά", "русский", "עברית", "العربية",
    "हिन्दी", "தமிழ்", "ไทย", "e\u0301", "a\u0308o\u0308", "👍🏽", "🤖", "👨\u200d👩\u200d👧",
    "🇫🇷", "123", "4,567.89", "0x1F", "3.14159", "١٢٣", "²³", "½", "Ⅻ",
    "!", "?!", "...", "--", "(", ")", "[x]", "{y}", "\"quoted\"", "'single'", "`tick`",
    "#tag", "@user", "a+b=c", "50%", "$100", "€5", "<|endoftext|>", "<|endoftext", "|>",
    "\u00a0", "\u2003", "\u3000", "\t", "\n", "\n\n", "  ", "   ", "\r\n", " \n ", "\u200b",
    "\u0000", "\u001f", "\u2028", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious", "Ünïcödé", "ǅ", "ǈ", "İstanbul", "ß", "ẞ",
]

WORDS = (
    "the quick brown fox jumps over the lazy dog and then to be or not to be that is the "
    "question whether tis nobler in the mind to suffer the slings and arrows of outrageous "
    "fortune"
).split()


def document(rng):
    parts = []
    for _ in range(rng.randint(1, 60)):
        r = rng.random()
        if r < 0.55:
            parts.append(rng.choice(WORDS))
        else:
            parts.append(rng.choice(PIECES))
        parts.append(rng.choice([" ", " ", " ", "", "  ", "\n", ", ", ". "]))
    return "".join(parts)


def main(out_dir):
    rng = random.Random(16)
    docs = [document(rng) for _ in range(150)]
    with open(f"{out_dir}/corpus.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d, "title": d[:12]}, ensure_ascii=(i % 2 == 0)) + "\n")
    with open(f"{out_dir}/edge.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[:40]):
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            if i % 10 == 0:
                f.write(json.dumps({"text": ""}) + "\n")
            if i % 10 == 5:
                f.write(json.dumps({"text": "  \n "}) + "\n")
    with open(f"{out_dir}/sentences.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[40:80]):
            if i % 3 == 0:
                f.write(json.dumps({"text": [d[:20], "", d[20:]]}, ensure_ascii=False) + "\n")
            elif i % 3 == 1:
                f.write(json.dumps({"text": []}) + "\n")
            else:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


def pad_vocab(out_dir, tok_dir, size=65500):
    with open(f"{tok_dir}/vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    for i in range(len(vocab), size):
        vocab[f"<|pad_{i}|>"] = i
    with open(f"{out_dir}/vocab-{size}.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])
    if len(sys.argv) == 4 and sys.argv[2] == "--pad-vocab":
        pad_vocab(sys.argv[1], sys.argv[3])
