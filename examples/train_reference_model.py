"""Render the synthetic corpus and train (or resume) a reference CTC model on CPU.

Usage:
    python examples/train_reference_model.py corpus --out corpus/ [--real-clips LJSPEECH_TSV]
    python examples/train_reference_model.py train --model ref-wav2vec2 --corpus corpus/ --minutes 60
    python examples/train_reference_model.py export --model ref-wav2vec2 --run runs/ref-wav2vec2

`corpus` needs espeak-ng. `train` resumes from runs/<model>/state.pt when present, or
from the shipped model folder. `export` copies the best checkpoint into the package.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sq_pt2e.assets import asset_path
from sq_pt2e.data import read_manifest
from sq_pt2e.train.corpus import CorpusSpec, build_corpus, read_split
from sq_pt2e.train.trainer import REFERENCE_MODELS, TrainConfig, evaluate, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    corpus = verbs.add_parser("corpus", help="render the synthetic corpus")
    corpus.add_argument("--out", type=Path, default=Path("corpus"))
    corpus.add_argument("--sentences", type=Path, default=asset_path("text", "ljspeech_sentences.txt"))
    corpus.add_argument("--real-clips", type=Path, default=None, help="LJSpeech transcripts.tsv of real clips")
    corpus.add_argument("--train-sentences", type=int, default=8000)
    corpus.add_argument("--workers", type=int, default=2)
    corpus.add_argument("--seed", type=int, default=0)
    run = verbs.add_parser("train", help="train or resume a reference model")
    run.add_argument("--model", choices=sorted(REFERENCE_MODELS), required=True)
    run.add_argument("--corpus", type=Path, default=Path("corpus"))
    run.add_argument("--runs", type=Path, default=Path("runs"))
    run.add_argument("--minutes", type=float, default=60.0)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--real-repeat", type=int, default=3, help="how often the real clips appear per epoch")
    export = verbs.add_parser("export", help="copy the best checkpoint into the package and report its test WER")
    export.add_argument("--model", choices=sorted(REFERENCE_MODELS), required=True)
    export.add_argument("--run", type=Path, required=True)
    export.add_argument("--corpus", type=Path, default=Path("corpus"))
    args = parser.parse_args(argv)

    if args.verb == "corpus":
        sentences = args.sentences.read_text(encoding="utf-8").splitlines()
        real = read_manifest(args.real_clips) if args.real_clips else []
        spec = CorpusSpec(train_sentences=args.train_sentences, seed=args.seed)
        for split, path in build_corpus(args.out, sentences, spec, real_clips=real, workers=args.workers).items():
            print(split, path)
        return 0
    if args.verb == "train":
        train_set = read_split(args.corpus, "train")
        if (args.corpus / "real-train.tsv").exists():
            train_set += read_split(args.corpus, "real-train") * args.real_repeat
        shipped = asset_path("models", args.model)
        record = train(args.model, train_set, read_split(args.corpus, "dev"), args.runs / args.model,
                       config=TrainConfig(threads=args.threads), minutes=args.minutes,
                       init_from=str(shipped) if (shipped / "train_state.json").exists() else None)
        print(record)
        return 0
    best = args.run / "best"
    target = asset_path("models", args.model)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(best, target)
    print({"test": evaluate_folder(target, read_split(args.corpus, "test"))})
    return 0


def evaluate_folder(folder: Path, utterances: list) -> dict[str, float]:
    from transformers import AutoModelForCTC

    return evaluate(AutoModelForCTC.from_pretrained(folder), utterances)


if __name__ == "__main__":
    raise SystemExit(main())
