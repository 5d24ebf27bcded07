r"""Evaluate a checkpoint: corpus CER and WER of each decoder on one split.

    python tools/evaluate.py --ckpt runs/base/checkpoints/best.pt
    python tools/evaluate.py --ckpt runs/base/checkpoints/best.pt --split validation \
        --decoders greedy,beam,beam_lm --json results.json --errors errors.tsv
Any other dataset (data.* overrides on top of the checkpoint's config), beam settings (decode.*):
    python tools/evaluate.py --ckpt runs/copiste/checkpoints/best.pt --split validation \
        data.source=parquet data.validation=../shared/data/copiste-h64/validation.parquet
    python tools/evaluate.py --ckpt runs/base/checkpoints/best.pt --decoders beam_lm \
        --lm lm.arpa decode.lm_weight=0.8 decode.beam_size=20

The forward pass runs in float32 unless `--amp` (auto, bf16, fp16, off: as `train.amp` means them)
asks for autocast, e.g. `--amp bf16` to evaluate in the precision the run validated in.

Prints one row per decoder: CER, WER, lines, lines/s of decoding alone and lines/s of the whole
pass (loading, forward, loss and every decoder). `--json OUT` writes, per decoder, cer, wer,
lines, lines_per_s (whole pass), decode_lines_per_s and the sums behind the rates (char_errors,
chars, word_errors, words). `--errors OUT.tsv` lists every line, worst CER first: id, reference,
hypothesis, cer (tab-separated, a header line; a backslash escapes tabs, newlines and
backslashes inside texts: csv.reader(f, delimiter="\\t", quoting=csv.QUOTE_NONE,
escapechar="\\\\") reads it back). With several decoders there is one file per decoder:
errors.tsv -> errors.greedy.tsv, errors.beam.tsv, ...

A split that lists several sources (docs/data.md) is evaluated whole, with a row per source under
each decoder's (in --json, "sources": {name: {cer, wer, lines, and the sums}}); `--source NAME`
evaluates that source alone:
    python tools/evaluate.py --ckpt runs/copiste_cremma18/checkpoints/best.pt --split validation --source cremma18

beam_lm's character language model: --lm FILE (same as decode.lm_path=FILE: an ARPA file from
tools/build_lm.py or KenLM, or a KenLM binary), else estimated on the fly (decode.lm_order) from
<run>/train_texts.txt, which tools/train.py writes next to <run>/checkpoints/. Beam decoders run
in decode.workers processes (0, the default: one per CPU core), overlapping with the next
batch's forward pass.

A model with a calibration (fitted at the end of training or by tools/calibrate.py) is also
measured against the truth: the estimated against the true CER, the ECE of p_exact and of the
character confidences, the AUROC of finding the lines with errors and the share of the errors in
the 20% of lines with the most expected errors ("calibration" in --json, with the reliability
bins); --reliability OUT.png draws the reliability diagram.

Choose the LM weights on data (the validation split unless --split says otherwise):
    python tools/evaluate.py --ckpt runs/base/checkpoints/best.pt --tune-lm \
        [--lm-weights 0,0.25,0.5,0.75,1,1.5] [--word-scores -1,0,1,2]
prints beam_lm's CER/WER for every pair, best first, and writes the best pair to <run>/decode.yaml,
which evaluate and predict then use for this run's checkpoints (decode.* overrides still win).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from crnn.calibration import CalibrationProbe, calibration_report, describe_report, reliability_diagram
from crnn.config import AMP_MODES, SPLITS
from crnn.data import Preprocess, build_dataset, build_loader, load_records
from crnn.data.records import problem_summary, require_lines
from crnn.decoding import DECODER_NAMES
from crnn.device import resolve_amp
from crnn.engine import EvalResult, evaluate
from crnn.errors import ConfigError, DataError, tool_main
from crnn.inference import TrainedModel, labelled_lines, load_trained_model, save_tuned, tune_language_model
from crnn.metrics import worst_lines_first
from crnn.outputs import check_output_file, json_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint, e.g. runs/base/checkpoints/best.pt")
    parser.add_argument("--split", choices=SPLITS, help="default: test (validation with --tune-lm)")
    parser.add_argument("--source", help="of a split that lists several sources, only the one of this name "
                                         "(default: all, each reported on its own)")
    parser.add_argument("--decoders", default="greedy",
                        help=f"comma-separated, from {', '.join(DECODER_NAMES)} (default: greedy)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--errors", type=Path, help="write per-line errors (TSV, worst first) here")
    parser.add_argument("--reliability", type=Path,
                        help="a calibrated model: draw the split's reliability diagram (PNG) here")
    parser.add_argument("--lm", help="language model file for beam_lm (same as decode.lm_path=...)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="off", choices=AMP_MODES,
                        help="autocast of the forward pass, as train.amp means it (default off: float32, so the "
                             "figures do not depend on the GPU's precision)")
    parser.add_argument("--tune-lm", action="store_true", help="grid-search decode.lm_weight and decode.word_score")
    parser.add_argument("--lm-weights", default="0,0.25,0.5,0.75,1,1.5", help="--tune-lm grid")
    parser.add_argument("--word-scores", default="-1,0,1,2", help="--tune-lm grid")
    parser.add_argument("overrides", nargs="*", help="data.* / decode.* overrides, e.g. data.batch_size=8")
    return parser.parse_args(argv)


def decoder_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DECODER_NAMES]
    if unknown or not names:
        raise ConfigError(f"--decoders {text!r}: give a comma-separated list of {', '.join(DECODER_NAMES)}")
    return names


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run(trained: TrainedModel, split: str, names: list[str], amp: str = "off",
        probe: CalibrationProbe | None = None, source: str | None = None) -> tuple[EvalResult, list[str]]:
    """Evaluate every decoder in one pass over `split` (or its `source`); returns the result and the
    line ids. With `probe`, it reads in greedy's place (the same readings) and keeps the
    calibration's estimates."""
    cfg = trained.config
    amp_dtype = resolve_amp(amp, trained.device, key="--amp")
    # first: a missing LM is found before the data is read
    decoders = trained.decoders([name for name in names if not (probe and name == "greedy")])
    decoders = {"greedy": probe, **decoders} if probe else decoders
    records = load_records(cfg.data, split, source)
    if records.problems:
        warn(f"{len(records.problems)} line(s) of {records.name} left out ({problem_summary(records.problems)}); "
             f"first: {records.problems[0]} (tools/check_data.py lists them all)")
    unknown = trained.vocab.unknown_in(records.texts)
    if unknown:
        warn(f"characters not in the checkpoint's vocab (counted as errors): {''.join(sorted(unknown))!r}")
    require_lines(records, f"data.{split}")
    squeezed = Preprocess.from_config(cfg.data).squeeze_warning(records.size_array(), f"data.{split}")
    if squeezed:
        warn(squeezed)
    loader = build_loader(cfg.data, build_dataset(cfg.data, records, trained.vocab, train=False), train=False)
    result = evaluate(trained.model, loader, trained.device, decoders, amp_dtype, keep_predictions=True,
                      desc=f"evaluate {split}")
    if not any(counts.lines for counts in result.counts.values()):  # not a 0% CER: nothing was read
        raise DataError(f"data.{split}: no line of {records.name} could be read ({result.unreadable} unreadable); "
                        f"first: {(result.problems or ['-'])[0]}")
    if result.unreadable:
        warn(f"{result.unreadable} unreadable line(s) left out ({problem_summary(result.problems)}); first: "
             f"{result.problems[0]} (tools/check_data.py lists them all)")
    return result, records.ids


def measure_calibration(probe: CalibrationProbe, result: EvalResult, reliability: Path | None) -> dict:
    """What the model's calibration says against the truth of the lines `probe` read: printed,
    drawn (`reliability`, a PNG), returned."""
    calibration = probe.calibration
    references, hypotheses = zip(*[(ref, hyp) for _, ref, hyp in result.predictions["greedy"]], strict=True)
    report = calibration_report(probe.judgements(hypotheses), references, hypotheses)
    print(f"calibration (temperature {calibration.temperature:.3f}, fitted on {calibration.lines} lines of the "
          f"{calibration.fitted_on or 'unknown split'}), measured on {report['lines']} lines:")
    print("\n".join(describe_report(report)))
    if reliability:
        reliability_diagram({"characters": report["reliability_characters"],
                             "lines read exactly": report["reliability_p_exact"]}).save(reliability)
        print(f"reliability diagram: {reliability}", file=sys.stderr)
    return report


def summary(result: EvalResult) -> dict[str, dict]:
    """Per decoder: rates, line counts and speeds, and the sums the rates come from; with several
    sources, each one's rates and sums under `sources`."""
    rows = {}
    for name, counts in result.counts.items():
        rows[name] = {
            "cer": counts.cer, "wer": counts.wer, "lines": counts.lines,
            "lines_per_s": counts.lines / max(result.seconds, 1e-9),
            "decode_lines_per_s": counts.lines / max(result.decode_seconds[name], 1e-9),
            "char_errors": counts.char_errors, "chars": counts.chars,
            "word_errors": counts.word_errors, "words": counts.words,
        }
        if result.by_source:
            rows[name]["sources"] = {source: {"cer": table[name].cer, "wer": table[name].wer, "lines": table[name].lines,
                                              "char_errors": table[name].char_errors, "chars": table[name].chars,
                                              "word_errors": table[name].word_errors, "words": table[name].words}
                                     for source, table in result.by_source.items()}
    return rows


def print_table(rows: dict[str, dict]) -> None:
    """A row per decoder (all the split's lines), and under it a row per source when there are several."""
    width = max([10, *(len(source) + 3 for row in rows.values() for source in row.get("sources", {}))])
    print(f"{'decoder':<{width}}{'CER':>9}{'WER':>9}{'lines':>8}{'decode lines/s':>16}{'lines/s':>10}")
    for name, row in rows.items():
        print(f"{name:<{width}}{row['cer']:>9.2%}{row['wer']:>9.2%}{row['lines']:>8}"
              f"{row['decode_lines_per_s']:>16.1f}{row['lines_per_s']:>10.1f}")
        for source, part in row.get("sources", {}).items():
            print(f"{'  ' + source:<{width}}{part['cer']:>9.2%}{part['wer']:>9.2%}{part['lines']:>8}")


def write_errors(path: Path, result: EvalResult, ids: list[str]) -> None:
    """One TSV per decoder (the path itself when there is only one), worst line first."""
    for name, predictions in result.predictions.items():
        target = path if len(result.predictions) == 1 else path.with_name(f"{path.stem}.{name}{path.suffix}")
        with open(target, "w", encoding="utf-8", newline="") as stream:
            writer = csv.writer(stream, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\",
                                lineterminator="\n")
            writer.writerow(["id", "reference", "hypothesis", "cer"])
            for line in worst_lines_first((ids[index], ref, hyp) for index, ref, hyp in predictions):
                writer.writerow([line.id, line.reference, line.hypothesis, f"{line.cer:.4f}"])
        print(f"errors of {name}: {target}", file=sys.stderr)


def grid(text: str, option: str) -> list[float]:
    try:
        values = [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option} {text!r}: give comma-separated numbers, e.g. 0,0.5,1")
    return values


def tune(trained: TrainedModel, split: str, lm_weights: list[float], word_scores: list[float],
         source: str | None = None) -> None:
    """--tune-lm: the grid's table, best first; the best pair saved for the run."""
    lines = labelled_lines(trained, split, check=False, source=source)
    rows = tune_language_model(trained, lines, lm_weights, word_scores)
    print(f"{'lm_weight':>10}{'word_score':>12}{'CER':>9}{'WER':>9}")
    for row in rows:
        print(f"{row['lm_weight']:>10g}{row['word_score']:>12g}{row['cer']:>9.2%}{row['wer']:>9.2%}")
    path = save_tuned(trained, rows[0])
    print(f"best on {split}: decode.lm_weight={rows[0]['lm_weight']:g} decode.word_score="
          f"{rows[0]['word_score']:g}, written to {path}", file=sys.stderr)


@tool_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    split = args.split or ("validation" if args.tune_lm else "test")
    names = decoder_names(args.decoders)
    overrides = args.overrides + ([f"decode.lm_path={args.lm}"] if args.lm else [])
    for option, path in (("--json", args.json), ("--errors", args.errors), ("--reliability", args.reliability)):
        if path is not None:
            check_output_file(path, option)
    trained = load_trained_model(args.ckpt, overrides, args.device)
    if args.tune_lm:
        tune(trained, split, grid(args.lm_weights, "--lm-weights"), grid(args.word_scores, "--word-scores"),
             args.source)
        return 0
    probe = CalibrationProbe(trained.calibration, trained.vocab) if trained.calibration.fitted else None
    result, ids = run(trained, split, names, args.amp, probe, args.source)
    rows = summary(result)
    if probe is not None and "greedy" not in names:
        del rows["greedy"]  # read for the calibration only
    print_table(rows)
    report = measure_calibration(probe, result, args.reliability) if probe else None
    if args.reliability and not probe:
        warn(f"{args.ckpt} has no calibration: no reliability diagram (fit one with tools/calibrate.py)")
    if args.json:
        args.json.write_text(json_text({**rows, **({"calibration": report} if report else {})}, indent=2) + "\n",
                             encoding="utf-8")
    if args.errors:
        write_errors(args.errors, result, ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
