"""Command line of the reference-model training: ``python -m sq_pt2e.train VERB ...``.

Verbs:
    corpus   render the synthetic corpus (and list the real LJ Speech clips) into corpus/
    train    train or resume a reference model under runs/<model>/
    ship     copy a seeded sample of the dev and test splits into the package (assets/synthetic)
    export   copy the best checkpoint into the package, evaluate it, write its model card
    card     evaluate a shipped reference model again and rewrite its model card
    lm       estimate the shipped word 3-gram language model from the training sentences
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from sq_pt2e.data import Utterance

__all__ = ["main", "training_utterances"]

_DEFAULT_LJSPEECH = "../shared/data/supplementary/ljspeech/transcripts.tsv"


def training_utterances(corpus: Path, real_repeat: int = 3) -> list[Utterance]:
    """The synthetic training split plus the real training clips repeated ``real_repeat`` times.

    Args:
        corpus: a corpus folder written by ``corpus``.
        real_repeat: weight of the real LJ Speech clips (they are few).
    """
    from sq_pt2e.train.corpus import read_split

    utterances = read_split(corpus, "train")
    if (corpus / "real-train.tsv").exists():
        real = read_split(corpus, "real-train")
        utterances += [Utterance(f"{u.id}#{k}", u.path, u.text) for k in range(real_repeat) for u in real]
    return utterances


def _parser() -> argparse.ArgumentParser:
    from sq_pt2e.train.corpus import SPLITS
    from sq_pt2e.train.trainer import REFERENCE_MODELS

    parser = argparse.ArgumentParser(prog="python -m sq_pt2e.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    corpus = verbs.add_parser("corpus", help="render the synthetic corpus")
    corpus.add_argument("--out", type=Path, default=Path("corpus"))
    corpus.add_argument("--sentences", type=Path, default=None,
                        help="one sentence per line (default: the shipped LJ Speech sentences)")
    real_clips = corpus.add_mutually_exclusive_group()
    real_clips.add_argument("--real-clips", type=Path, default=Path(_DEFAULT_LJSPEECH),
                            help="transcripts.tsv of the real LJ Speech clips (default: %(default)s, relative to the "
                                 "working directory); their sentences stay out of dev and test, so the splits depend "
                                 "on them")
    real_clips.add_argument("--no-real-clips", action="store_true",
                            help="a synthetic-only corpus (its sentence splits differ from the shipped models')")
    corpus.add_argument("--train-sentences", type=int, default=8000)
    corpus.add_argument("--workers", type=int, default=2)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--engines", default=None,
                        help="comma-separated subset of espeak-ng,flite,festival (default: those installed)")
    corpus.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="splits to render: 'dev test' renders the evaluation splits alone (seconds), the same "
                             "to the sample as in the whole corpus")
    run = verbs.add_parser("train", help="train or resume a reference model")
    run.add_argument("--model", choices=sorted(REFERENCE_MODELS), required=True)
    run.add_argument("--corpus", type=Path, default=Path("corpus"))
    run.add_argument("--runs", type=Path, default=Path("runs"))
    run.add_argument("--minutes", type=float, default=60.0)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--real-repeat", type=int, default=3, help="how often the real clips count in sampling")
    run.add_argument("--total-steps", type=int, default=None,
                     help="end the cosine schedule at this step instead of the recipe's (e.g. to anneal the "
                          "learning rate within this run; a later run without it restarts the recipe's schedule)")
    run.add_argument("--dropout", type=float, default=None, help="model dropout (default: the recipe's)")
    run.add_argument("--mask-time-prob", type=float, default=None,
                     help="SpecAugment time-masking probability (default: the recipe's)")
    run.add_argument("--speed-perturb", type=float, default=None,
                     help="resample each training clip by a random factor in [1-S, 1+S] (default: the recipe's)")
    run.add_argument("--layers", type=int, default=None,
                     help="Transformer layers (default: the recipe's); weights of a shallower model are deepened "
                          "by repeating each layer in place")
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast in the training forward pass (fast on CPUs with AMX-BF16; "
                          "--no-bf16 on CPUs without, where it is emulated and slow)")
    run.add_argument("--no-init", action="store_true",
                     help="without runs/<model>/state.pt start from scratch, not from the shipped weights")
    ship = verbs.add_parser("ship", help="copy a seeded sample of the dev and test splits into the package")
    ship.add_argument("--corpus", type=Path, default=Path("corpus"))
    ship.add_argument("--test", type=int, default=120, help="test utterances to ship")
    ship.add_argument("--dev", type=int, default=30, help="dev utterances to ship")
    ship.add_argument("--seed", type=int, default=0)
    export = verbs.add_parser("export", help="copy the best checkpoint into the package and write its model card")
    export.add_argument("--model", choices=sorted(REFERENCE_MODELS), required=True)
    export.add_argument("--runs", type=Path, default=Path("runs"))
    export.add_argument("--corpus", type=Path, default=Path("corpus"))
    export.add_argument("--threads", type=int, default=1)
    card = verbs.add_parser("card", help="evaluate a shipped reference model again and rewrite its model card")
    card.add_argument("--model", choices=sorted(REFERENCE_MODELS), required=True)
    card.add_argument("--corpus", type=Path, default=Path("corpus"))
    card.add_argument("--threads", type=int, default=1)
    lm = verbs.add_parser("lm", help="estimate the word language model from the corpus's training sentences")
    lm.add_argument("--corpus", type=Path, default=Path("corpus"),
                    help="the built corpus: its dev, test and held-out real clips stay out of the LM")
    lm.add_argument("--sentences", type=Path, default=None,
                    help="one sentence per line (default: the shipped LJ Speech sentences)")
    lm.add_argument("--order", type=int, default=3)
    lm.add_argument("--seed", type=int, default=0, help="the corpus's seed (it fixes the sentence splits)")
    lm.add_argument("--out", type=Path, default=None, help="ARPA file (.gz compresses; default: the shipped LM)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status.

    Args:
        argv: arguments (``sys.argv[1:]`` when ``None``).
    """
    args = _parser().parse_args(argv)
    if args.verb == "corpus":
        return _corpus(args)
    if args.verb == "train":
        return _train(args)
    if args.verb == "ship":
        return _ship(args)
    if args.verb == "card":
        return _card(args)
    if args.verb == "lm":
        return _lm(args)
    return _export(args)


def _corpus(args: argparse.Namespace) -> int:
    from sq_pt2e.assets import asset_path
    from sq_pt2e.data import read_manifest
    from sq_pt2e.train.corpus import CorpusSpec, build_corpus

    sentences_path = args.sentences or asset_path("text", "ljspeech_sentences.txt")
    sentences = sentences_path.read_text(encoding="utf-8").splitlines()
    if args.no_real_clips:
        real = []
    elif not args.real_clips.exists():
        raise SystemExit(f"no real clips at {args.real_clips.resolve()}: the shipped models' "
                         "corpus was built with the real LJ Speech clips, whose sentences stay out of dev and test, so "
                         "without them every split differs. Pass --real-clips PATH, or --no-real-clips for a "
                         "synthetic-only corpus")
    else:
        real = read_manifest(args.real_clips)
    spec = CorpusSpec(train_sentences=args.train_sentences, seed=args.seed)
    engines = args.engines.split(",") if args.engines else None
    built = build_corpus(args.out, sentences, spec, real_clips=real, workers=args.workers, engines=engines,
                         splits=args.splits)
    for split, path in built.items():
        print(split, path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from sq_pt2e.assets import asset_path
    from sq_pt2e.train.corpus import read_split
    from sq_pt2e.train.trainer import default_config, train

    shipped = asset_path("models", args.model)
    init = shipped if (shipped / "train_state.json").exists() and not args.no_init else None
    if init is not None:
        recorded = json.loads((shipped / "train_state.json").read_text(encoding="utf-8"))
        if recorded.get("config", {}).get("total_steps") is None:
            init = None  # weights of an older recipe and architecture: start afresh
    utterances = training_utterances(args.corpus, args.real_repeat)
    parts: dict[str, int] = {}
    for utt in utterances:
        source = "real LJ Speech (weighted)" if "#" in utt.id else utt.path.parent.name
        parts[source] = parts.get(source, 0) + 1
    record = train(args.model, utterances, read_split(args.corpus, "dev"), args.runs / args.model,
                   config=default_config(args.model, threads=args.threads, **_recipe_arguments(args)),
                   minutes=args.minutes, init_from=init,
                   data={"training utterances": parts})
    record.pop("losses", None)
    print(json.dumps(record))
    return 0


def _recipe_arguments(args: argparse.Namespace) -> dict[str, float | bool | int]:
    """The ``TrainConfig`` fields given on the command line."""
    given = {"total_steps": args.total_steps, "dropout": args.dropout, "mask_time_prob": args.mask_time_prob,
             "bf16": args.bf16, "speed_perturb": args.speed_perturb, "layers": args.layers}
    return {k: v for k, v in given.items() if v is not None}


_SHIPPED_README = """# Synthetic evaluation speech

`test.tsv` / `test/` and `dev.tsv` / `dev/`: a seeded sample of the test and dev splits
of the synthetic corpus (`python -m sq_pt2e.train corpus`, then
`python -m sq_pt2e.train ship`), 16 kHz 16-bit FLAC with normalised transcripts
(`path<TAB>text`). Sentences and voices are unseen in the reference models' training:
test voices are espeak-ng variants m4, f3, klatt3, david, linda, victor (8 English
accents) and flite's slt; dev voices are espeak-ng m6, f4, paul, steph and flite's kal.

License: the text is from LJ Speech (Keith Ito, 2017), whose transcriptions are in the
public domain. The audio was synthesized with espeak-ng (GPL-3.0) and flite (BSD-style
license); the GPL does not cover a program's output, and flite's output is unrestricted,
so these recordings carry no license restriction. `voices.tsv` lists each file's engine,
voice, rate and pitch.
"""


def _ship(args: argparse.Namespace) -> int:
    import random

    from sq_pt2e.assets import asset_path
    from sq_pt2e.atomic import atomic_write_text
    from sq_pt2e.data import write_manifest
    from sq_pt2e.train.corpus import read_split

    root = asset_path("synthetic")
    voices: dict[str, str] = {}
    for table in sorted((args.corpus / "parts").glob("*.voices.tsv")):
        for line in table.read_text(encoding="utf-8").splitlines()[1:]:
            voices[line.split("\t")[0]] = line
    rows = ["file\tsource_id\tengine\tvoice\tspeed\tpitch\tnoise_db\trt60_s"]
    for split, count in (("test", args.test), ("dev", args.dev)):
        utterances = read_split(args.corpus, split)
        chosen = sorted(random.Random(args.seed).sample(range(len(utterances)), min(count, len(utterances))))
        folder = root / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shipped = []
        for index, position in enumerate(chosen):
            utt = utterances[position]
            target = folder / f"{split}-{index:05d}.flac"
            shutil.copyfile(utt.path, target)
            shipped.append(Utterance(target.stem, target, utt.text))
            rows.append(f"{split}/{target.name}\t" + voices.get(utt.id, f"{utt.id}\t\t\t\t\t\t"))
        write_manifest(root / f"{split}.tsv", shipped)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{split}: {len(shipped)} utterances, {size / 1e6:.1f} MB")
    atomic_write_text(root / "voices.tsv", "\n".join(rows) + "\n")
    atomic_write_text(root / "README.md", _SHIPPED_README)
    return 0


def _evaluate_sets(folder: Path, corpus: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Error rates of the checkpoint in ``folder`` per evaluation set: greedy, and beam search with the shipped LM."""
    from sq_pt2e.asr import greedy_transcript
    from sq_pt2e.assets import language_model, librispeech_manifest, synthetic_manifest
    from sq_pt2e.beam import BeamSearchDecoder
    from sq_pt2e.lm import NgramLM
    from sq_pt2e.models.checkpoint import load_checkpoint
    from sq_pt2e.train.corpus import read_split
    from sq_pt2e.train.trainer import error_rates, utterance_logits

    model = load_checkpoint(folder)
    shipped = "synthetic test, shipped (unseen sentences and voices)"
    sets: dict[str, list[Utterance]] = {shipped: synthetic_manifest("test")}
    for name, split in (("synthetic test, full corpus split", "test"), ("synthetic dev", "dev"),
                        ("LJ Speech real clips, held out", "real-test")):
        if (corpus / f"{split}.tsv").exists():
            sets[name] = read_split(corpus, split)
    sets["LibriSpeech test-other (shipped 60)"] = librispeech_manifest("test-other")
    decoders = {"greedy": greedy_transcript, "lm": BeamSearchDecoder(NgramLM.load(language_model()))}
    results: dict[str, dict[str, dict[str, float]]] = {decoding: {} for decoding in decoders}
    for name, utts in sets.items():
        logits = utterance_logits(model, utts, progress=True)
        for decoding, decode in decoders.items():
            hyps = [decode(x) for x in logits]
            results[decoding][name] = error_rates([u.text for u in utts], hyps)
            if name == shipped:
                results[decoding] |= _per_voice(utts, hyps)
    return results["greedy"], results["lm"]


def _per_voice(utts: list[Utterance], hyps: list[str]) -> dict[str, dict[str, float]]:
    """Error rates per voice of the shipped synthetic test utterances, as ``"synthetic test, shipped: VOICE"``."""
    from sq_pt2e.assets import synthetic_voices
    from sq_pt2e.train.trainer import error_rates

    voices = synthetic_voices()
    by_voice: dict[str, tuple[list[str], list[str]]] = {}
    for utt, hyp in zip(utts, hyps, strict=True):
        refs, voice_hyps = by_voice.setdefault(voices.get(utt.id, "unknown voice"), ([], []))
        refs.append(utt.text)
        voice_hyps.append(hyp)
    return {f"synthetic test, shipped: {voice}": error_rates(refs, voice_hyps)
            for voice, (refs, voice_hyps) in sorted(by_voice.items())}


def _export(args: argparse.Namespace) -> int:
    import torch

    from sq_pt2e.assets import asset_path

    torch.set_num_threads(args.threads)
    best = args.runs / args.model / "best"
    if not (best / "config.json").exists():
        print(f"no best checkpoint at {best}")
        return 1
    target = asset_path("models", args.model)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.model}.", dir=target.parent))
    try:
        shutil.copytree(best, staging / "m")
        results = _write_card(staging / "m", args)
        old = target.with_name(f".{args.model}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging / "m", target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


def _write_card(folder: Path, args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate the checkpoint in ``folder`` and write its model card; the results per decoding."""
    from sq_pt2e.train.card import write_model_card

    results, lm_results = _evaluate_sets(folder, args.corpus)
    write_model_card(folder, args.model, results, lm_results)
    return {"greedy": results, "lm": lm_results}


def _card(args: argparse.Namespace) -> int:
    import torch

    from sq_pt2e.assets import reference_model

    torch.set_num_threads(args.threads)
    folder = reference_model(args.model)
    if folder is None:
        print(f"{args.model} is not shipped")
        return 1
    print(json.dumps(_write_card(folder, args), indent=2))
    return 0


def _lm(args: argparse.Namespace) -> int:
    from sq_pt2e.asr import normalize_transcript
    from sq_pt2e.assets import asset_path, language_model, synthetic_manifest
    from sq_pt2e.lm import NgramLM
    from sq_pt2e.train.corpus import CorpusSpec, read_split, split_sentences

    if not (args.corpus / "real-test.tsv").exists():
        print(f"no {args.corpus / 'real-test.tsv'}: build the corpus first "
              "(its held-out clips must stay out of the LM)")
        return 1
    sentences = (args.sentences or asset_path("text", "ljspeech_sentences.txt")).read_text(encoding="utf-8")
    held_out = {normalize_transcript(u.text) for u in read_split(args.corpus, "real-test")}
    train = split_sentences(sentences.splitlines(), CorpusSpec(seed=args.seed), held_out)["train"]
    evaluated = [u.text for split in ("dev", "test") for u in read_split(args.corpus, split)]
    evaluated += [u.text for split in ("dev", "test") for u in synthetic_manifest(split)]
    leaked = ({normalize_transcript(text) for text in evaluated} | held_out) & set(train)
    if leaked:
        print(f"{len(leaked)} evaluation sentence(s) would be in the LM, e.g. {sorted(leaked)[0]!r}: "
              "is --seed the corpus's?")
        return 1
    out = args.out or language_model()
    NgramLM.from_sentences(train, order=args.order).save(out)
    print(f"{out}: {args.order}-gram LM of {len(train)} training sentences, {out.stat().st_size / 1e6:.1f} MB")
    return 0
