"""Make a benchmark corpus of a given size from the embedded Shakespeare text (docs/data.md).

    python docs/bench/data_corpus.py OUT.jsonl --mb 40

jsonl documents of 20-400 lines each; every line is a random line of the embedded corpus, a third of them with a
word swapped for one from another line and a number appended, so the text varies and sentencepiece has work.
Deterministic (seed 0): the same command writes the same bytes.
"""
import argparse
import gzip
import json
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "launch" / "corpus" / "shakespeare.jsonl.gz"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--mb", type=float, required=True, help="size of the output in MB (10^6 bytes)")
    args = p.parse_args(argv)
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [ln for doc in f for ln in json.loads(doc)["text"].split("\n") if ln.strip()]
    words = [w for ln in lines for w in ln.split()]
    rng, target, written = random.Random(0), int(args.mb * 1e6), 0
    with open(args.out, "w", encoding="utf-8") as out:
        while written < target:
            doc = []
            for _ in range(rng.randint(20, 400)):
                line = rng.choice(lines)
                if rng.random() < 1 / 3:
                    parts = line.split()
                    parts[rng.randrange(len(parts))] = rng.choice(words)
                    line = " ".join(parts) + f" {rng.randint(0, 99999)}"
                doc.append(line)
            record = json.dumps({"text": "\n".join(doc)}) + "\n"
            out.write(record)
            written += len(record.encode())


if __name__ == "__main__":
    main()
