"""The toy-world benchmark's outputs: tables (markdown + CSV), the papers' claims checked on paired
images, and the identity-vs-prompt-fidelity Pareto scatter.

Uncertainty: each mean comes with the half-width of a 95 % normal-approximation interval over its images
(``1.96 · std / √n``). Images of one scene share its training run, so they are not independent and these
intervals are optimistic; ``results_per_scene.csv`` shows the spread between scenes. A claim compares two
variants on the *same* images keys (scene, prompt, seed — every variant generates from the same seeds), as
the mean paired difference with its own 95 % interval.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

from scenetok.errors import ConfigError
from scenetok.evaluation import tables
from scenetok.evaluation.toyworld.scoring import IMAGE_METRICS
from scenetok.io import atomic_write_png, atomic_write_text

METRIC_NAMES = {
    "identity": "identity",
    "identity_soft": "identity (partial)",
    "fidelity": "prompt fidelity",
    "leakage": "leakage",
    "scene_leakage": "scene leakage",
    "bg_leakage": "background leakage",
    "multi": "multi-concept",
    "mask_iou": "mask IoU",
}
LOWER_IS_BETTER = {"leakage", "scene_leakage", "bg_leakage"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("the toy-world benchmark draws its Pareto plot with matplotlib, which is not installed",
                          hint="pip install matplotlib (or pip install 'scenetok[bench]')") from None


# ----------------------------------------------------------------------------------------------------
# claims


@dataclass(frozen=True)
class Claim:
    """A paper's statement as a comparison: ``variant``'s ``metric`` is ``expect`` ("higher"/"lower")
    than ``reference``'s, on the prompts of ``kinds`` (all when None)."""

    paper: str
    text: str
    reference: str
    variant: str
    metric: str
    expect: str
    kinds: tuple[str, ...] | None = None


CLAIMS: tuple[Claim, ...] = (
    Claim("Break-A-Scene", "without phase 1 (tokens alone first) the model overfits: prompt fidelity drops",
          "break-a-scene", "break-a-scene --no-phase1", "fidelity", "lower"),
    Claim("Break-A-Scene", "without the masked loss the scene's background leaks in",
          "break-a-scene", "break-a-scene --no-masked-loss", "bg_leakage", "higher"),
    Claim("Break-A-Scene", "without the masked loss prompt fidelity drops",
          "break-a-scene", "break-a-scene --no-masked-loss", "fidelity", "lower"),
    Claim("Break-A-Scene", "without L_attn concepts mix or one replicates: leakage rises",
          "break-a-scene", "break-a-scene --no-attn-loss", "leakage", "higher"),
    Claim("Break-A-Scene", "without L_attn identity drops",
          "break-a-scene", "break-a-scene --no-attn-loss", "identity", "lower"),
    Claim("Break-A-Scene", "without union sampling multi-concept prompts fail",
          "break-a-scene", "break-a-scene --no-union-sampling", "multi", "lower"),
    Claim("Break-A-Scene", "without union sampling a single concept is not drawn alone",
          "break-a-scene", "break-a-scene --no-union-sampling", "identity", "lower", ("single",)),
    Claim("Break-A-Scene", "TI-m keeps identity worse than Break-A-Scene", "ti-m", "break-a-scene", "identity", "higher"),
    Claim("Break-A-Scene", "DB-m follows the prompt worse than Break-A-Scene", "db-m", "break-a-scene", "fidelity", "higher"),
    Claim("Break-A-Scene", "CD-m keeps identity worse than Break-A-Scene", "cd-m", "break-a-scene", "identity", "higher"),
    Claim("DisenDiff", "removing L_bind lowers identity", "disendiff", "disendiff --no-bind", "identity", "lower"),
    Claim("DisenDiff", "removing L_s&s lowers identity", "disendiff", "disendiff --no-ss", "identity", "lower"),
    Claim("DisenDiff", "no suppression (f_m) lowers identity", "disendiff", "disendiff --no-suppression", "identity", "lower"),
    Claim("DisenDiff", "no Gaussian smoothing lowers identity", "disendiff", "disendiff --no-gaussian", "identity", "lower"),
    Claim("DisenDiff", "attention on all scales fails on the second concept: multi-concept success drops",
          "disendiff", "disendiff --attn-scales all", "multi", "lower"),
    Claim("DisenDiff", "DisenDiff leaks less than CD-m", "cd-m", "disendiff", "leakage", "lower"),
    Claim("DisenDiff", "DisenDiff keeps identity better than CD-m", "cd-m", "disendiff", "identity", "higher"),
    Claim("Textual Localization", "soft guidance follows the prompt better than hard",
          "textual-localization", "textual-localization --guidance soft", "fidelity", "higher"),
    Claim("Textual Localization", "soft guidance keeps identity worse than hard",
          "textual-localization", "textual-localization --guidance soft", "identity", "lower"),
    Claim("Textual Localization", "hard guidance beats CD-m on identity (CLIP-I)", "cd-m", "textual-localization",
          "identity", "higher"),
    Claim("Textual Localization", "hard guidance beats CD-m on prompt fidelity (CLIP-T)", "cd-m",
          "textual-localization", "fidelity", "higher"),
    Claim("EM concept masks", "re-estimating the masks during training ends closer to the true masks than the "
          "initial attention masks", "em-masks --no-mask-updates", "em-masks", "mask_iou", "higher"),
)


def paired_values(rows: list[dict], reference: str, variant: str, metric: str, keys=("scene", "prompt", "seed"),
                  kinds=None) -> list[tuple[tuple, float, float]]:
    """``(key, reference value, variant value)`` for every key both variants have a value of ``metric`` for
    (in the reference's row order); ``kinds`` keeps only rows of those prompt kinds."""
    def index(label):
        out = {}
        for r in rows:
            if r.get("variant") != label or r.get(metric) is None:
                continue
            if kinds is not None and r.get("kind") not in kinds:
                continue
            out[tuple(r.get(k) for k in keys)] = float(r[metric])
        return out

    a, b = index(reference), index(variant)
    return [(k, a[k], b[k]) for k in a if k in b]


def paired_difference(rows: list[dict], reference: str, variant: str, metric: str, keys=("scene", "prompt", "seed"),
                      kinds=None) -> dict:
    """Mean of ``variant − reference`` over the keys both have a value for, with its 95 % interval."""
    pairs = paired_values(rows, reference, variant, metric, keys, kinds)
    diff = tables.mean_ci(vb - va for _, va, vb in pairs)
    ref = tables.mean_ci(va for _, va, _ in pairs)
    var = tables.mean_ci(vb for _, _, vb in pairs)
    return {"n": len(pairs), "reference_mean": ref["mean"], "variant_mean": var["mean"], "delta": diff["mean"],
            "delta_ci95": diff["ci95"]}


# two-sided 95 % Student-t quantiles by degrees of freedom (1-30); 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def per_run_difference(rows: list[dict], reference: str, variant: str, metric: str,
                       keys=("scene", "prompt", "seed"), kinds=None) -> dict:
    """The paired difference counted per run instead of per image: each run (``keys[0]``, the scene: one
    training run per scene and variant) gives the mean of its images' paired differences, and the result is the
    mean over runs with a Student-t 95 % interval over them (``run_delta_ci95`` None for fewer than two runs).
    The images of one run share its training draw, and a second training seed of the same settings moves the
    scores by more than the per-image interval (docs/toy-sd.md), so this is the interval to decide by."""
    by_run: dict = {}
    for k, va, vb in paired_values(rows, reference, variant, metric, keys, kinds):
        by_run.setdefault(k[0], []).append(vb - va)
    means = [sum(v) / len(v) for v in by_run.values()]
    k = len(means)
    if not k:
        return {"runs": 0, "run_delta": None, "run_delta_ci95": None}
    mean = sum(means) / k
    if k < 2:
        return {"runs": k, "run_delta": mean, "run_delta_ci95": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in means) / (k - 1))
    t = _T975[k - 2] if k - 1 <= len(_T975) else 1.96
    return {"runs": k, "run_delta": mean, "run_delta_ci95": t * sd / math.sqrt(k)}


def verdict(delta: float | None, ci: float | None, expect: str, n: int) -> str:
    """``holds`` (the expected direction, the 95 % interval excludes 0), ``holds, within noise``,
    ``no difference``, ``does not hold, within noise`` or ``reversed`` (wrong direction beyond noise)."""
    if not n or delta is None:
        return "no data"
    if delta == 0:
        return "no difference"
    right = (delta < 0) if expect == "lower" else (delta > 0)
    clear = abs(delta) > (ci or 0.0)
    if right:
        return "holds" if clear else "holds, within noise"
    return "reversed" if clear else "does not hold, within noise"


def check_claims(image_rows: list[dict], mask_rows: list[dict], claims=CLAIMS) -> list[dict]:
    """Each claim whose two variants both have results: the paired comparison and its verdict."""
    out = []
    labels = {r["variant"] for r in image_rows} | {r["variant"] for r in mask_rows}
    for c in claims:
        if c.reference not in labels or c.variant not in labels:
            continue
        if c.metric == "mask_iou":
            d = paired_difference(mask_rows, c.reference, c.variant, "mask_iou", keys=("scene", "concept"))
            r = per_run_difference(mask_rows, c.reference, c.variant, "mask_iou", keys=("scene", "concept"))
        else:
            d = paired_difference(image_rows, c.reference, c.variant, c.metric, kinds=c.kinds)
            r = per_run_difference(image_rows, c.reference, c.variant, c.metric, kinds=c.kinds)
        out.append({"paper": c.paper, "claim": c.text, "metric": c.metric + (f" ({', '.join(c.kinds)})" if c.kinds else ""),
                    "reference": c.reference, "variant": c.variant, "expect": c.expect, **d,
                    "verdict": verdict(d["delta"], d["delta_ci95"], c.expect, d["n"]), **r,
                    "verdict_runs": verdict(r["run_delta"], r["run_delta_ci95"], c.expect, r["runs"])
                    if r["run_delta_ci95"] is not None else "too few runs"})
    return out


# ----------------------------------------------------------------------------------------------------
# reading runs and writing the report


def read_runs(job_list: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """``(runs, image_rows, mask_rows)`` of every planned run that has a ``run.json`` with the planned key."""
    runs, images, masks = [], [], []
    for j in job_list:
        d = Path(j["run_dir"])
        f = d / "run.json"
        if not f.is_file():
            runs.append({"variant": j["variant"], "scene": j["scene"], "status": "missing"})
            continue
        info = json.loads(f.read_text())
        if info.get("key") != j["key"]:
            runs.append({"variant": j["variant"], "scene": j["scene"], "status": "stale"})
            continue
        runs.append(info)
        if info.get("status") != "ok":
            continue
        for line in (d / "scores.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                row["variant"] = j["variant"]
                row["image"] = str(Path("runs") / j["slug"] / j["scene"] / row["image"])
                images.append(row)
        for k, iou in enumerate(info.get("mask_iou") or []):
            masks.append({"variant": j["variant"], "scene": j["scene"], "concept": k, "mask_iou": iou})
    return runs, images, masks


def summary_table(variants, runs: list[dict], image_rows: list[dict], mask_rows: list[dict]) -> list[dict]:
    """One row per variant (suite order): image-metric stats, mask IoU stats, runs and time per run."""
    stats = {r["variant"]: r for r in tables.group_stats(image_rows, ["variant"], IMAGE_METRICS)}
    mstats = {r["variant"]: r for r in tables.group_stats(mask_rows, ["variant"], ["mask_iou"], count="masks")}
    out = []
    for v in variants:
        mine = [r for r in runs if r.get("variant") == v.label]
        ok = [r for r in mine if r.get("status") == "ok"]
        row = {"variant": v.label, "method": v.method, "ablation": v.flag or "", "runs": len(ok),
               "failed": len(mine) - len(ok)}
        s = stats.get(v.label, {"images": 0})
        row["images"] = s.get("images", 0)
        for m in IMAGE_METRICS:
            for suffix in ("", "_ci95", "_std", "_n"):
                row[m + suffix] = s.get(m + suffix)
        ms = mstats.get(v.label, {})
        for suffix in ("", "_ci95", "_std", "_n"):
            row["mask_iou" + suffix] = ms.get("mask_iou" + suffix)
        for key in ("train_s", "wall_s", "cpu_s"):
            vals = [r[key] for r in ok if key in r]
            row[key + "_per_run"] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


def _pm(row: dict, m: str, with_n: bool = False) -> str:
    v = row.get(m)
    if v is None:
        return "–"
    text = f"{v:.2f} ± {row.get(m + '_ci95') or 0:.2f}"
    return f"{text} ({row.get(m + '_n')})" if with_n else text


def markdown_summary(table: list[dict]) -> str:
    cols = ["variant", "runs", "images", "identity", "identity (partial)", "prompt fidelity", "leakage",
            "scene leakage", "bg leakage", "multi-concept (n)", "mask IoU (n)", "train s/run"]
    rows = []
    for r in table:
        rows.append({
            "variant": r["variant"], "runs": f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            "images": r["images"], "identity": _pm(r, "identity"), "identity (partial)": _pm(r, "identity_soft"),
            "prompt fidelity": _pm(r, "fidelity"), "leakage": _pm(r, "leakage"),
            "scene leakage": _pm(r, "scene_leakage"), "bg leakage": _pm(r, "bg_leakage"),
            "multi-concept (n)": _pm(r, "multi", True), "mask IoU (n)": _pm(r, "mask_iou", True),
            "train s/run": "–" if r.get("train_s_per_run") is None else f"{r['train_s_per_run']:.0f}",
        })
    return tables.markdown_table(rows, cols)


def markdown_claims(claims: list[dict]) -> str:
    rows = []
    for c in claims:
        def fmt(x):
            return "–" if x is None else f"{x:.2f}"
        rows.append({"paper": c["paper"], "claim": c["claim"], "metric": c["metric"],
                     "reference → variant": f"{c['reference']} → {c['variant']}",
                     "values (paired)": f"{fmt(c['reference_mean'])} → {fmt(c['variant_mean'])}",
                     "Δ ± 95 % CI (images)": "–" if c["delta"] is None else f"{c['delta']:+.3f} ± {c['delta_ci95'] or 0:.3f}",
                     "n": c["n"], "verdict (images)": c["verdict"],
                     "Δ ± 95 % CI (runs)": "–" if c.get("run_delta_ci95") is None
                     else f"{c['run_delta']:+.3f} ± {c['run_delta_ci95']:.3f}",
                     "runs": c.get("runs", 0), "verdict (runs)": c.get("verdict_runs", "–")})
    return tables.markdown_table(rows)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def pareto_plot(table: list[dict], path: str | Path, title: str) -> Path | None:
    """Identity (y) against prompt fidelity (x), one point per variant with its 95 % intervals; colour
    per method, the paper recipe as a large circle, ablations as smaller markers labelled by their flag;
    the Pareto front dashed (like Break-A-Scene's Fig. 5)."""

    from matplotlib.figure import Figure


    pts = [r for r in table if r.get("identity") is not None and r.get("fidelity") is not None]
    fig = Figure(figsize=(8.5, 6.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(r["method"] for r in table))
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    markers = ["s", "^", "v", "D", "P", "X", "<", ">", "h"]
    seen_marker: dict[str, int] = {}
    for r in pts:
        c = colours[methods.index(r["method"]) % len(colours)]
        if r["ablation"]:
            k = seen_marker.setdefault(r["method"], 0)
            seen_marker[r["method"]] = k + 1
            mk, size, label = markers[k % len(markers)], 45, r["ablation"]
        else:
            mk, size, label = "o", 110, r["method"]
        ax.errorbar(r["fidelity"], r["identity"], xerr=r.get("fidelity_ci95") or 0, yerr=r.get("identity_ci95") or 0,
                    fmt="none", ecolor=c, alpha=0.35, linewidth=1)
        ax.scatter([r["fidelity"]], [r["identity"]], s=size, marker=mk, color=c, edgecolors="black", linewidths=0.5,
                   zorder=3)
        ax.annotate(label, (r["fidelity"], r["identity"]), xytext=(5, 4), textcoords="offset points", fontsize=7,
                    color=c if r["ablation"] else "black")
    if len(pts) > 1:
        front = pareto_front([(r["fidelity"], r["identity"]) for r in pts])
        ax.plot([pts[i]["fidelity"] for i in front], [pts[i]["identity"] for i in front], "--", color="gray",
                linewidth=1, zorder=1, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("prompt fidelity (requested background obeyed)")
    ax.set_ylabel("identity (requested concept found with its true attributes)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return atomic_write_png(path, fig)


def write_report(out_dir: Path, job_list, variants, scenes, *, model: str, seeds: int, steps: int, guidance: float,
                 timing: dict, sampler: str = "ddim") -> dict:
    """Read every run and write ``results.md``, ``results.csv``, ``results_by_kind.csv``,
    ``results_per_scene.csv``, ``images.csv``, ``claims.csv``, ``pareto.png`` and ``timing.json``."""

    out_dir = Path(out_dir)
    runs, image_rows, mask_rows = read_runs(job_list)
    table = summary_table(variants, runs, image_rows, mask_rows)
    by_kind = tables.group_stats(image_rows, ["variant", "kind"], ("identity", "fidelity", "leakage", "scene_leakage", "multi"))
    per_scene = tables.group_stats(image_rows, ["variant", "scene"], IMAGE_METRICS)
    claims = check_claims(image_rows, mask_rows)
    tables.write_csv(out_dir / "results.csv", table)
    tables.write_csv(out_dir / "results_by_kind.csv", by_kind)
    tables.write_csv(out_dir / "results_per_scene.csv", per_scene)
    tables.write_csv(out_dir / "images.csv", image_rows)
    tables.write_csv(out_dir / "claims.csv", claims)
    tables.write_csv(out_dir / "runs.csv", [{k: v for k, v in r.items() if k != "traceback"} for r in runs])
    _write_timing(out_dir, runs, timing)
    title = (f"toy world: {len(variants)} variants × {len(scenes)} scenes, {seeds} seed(s)/prompt "
             f"(model {Path(model).name})")
    pareto_plot(table, out_dir / "pareto.png", title)
    kind_rows = [{"variant": r["variant"], "kind": r["kind"], "images": r["images"],
                  "identity": _pm(r, "identity"), "prompt fidelity": _pm(r, "fidelity"),
                  "leakage": _pm(r, "leakage"), "multi-concept": _pm(r, "multi")} for r in by_kind]
    failed = [r for r in runs if r.get("status") != "ok"]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Toy-world benchmark", "",
        f"Generated {stamp}. Base model `{model}` (fingerprint `{_fingerprint(out_dir)}`); scenes: "
        f"{', '.join(s.name for s in scenes)}; {seeds} image(s) per prompt; sampler {sampler}, {steps} steps, guidance {guidance}.",
        "", _timing_line(timing), "",
        "## Results", "",
        "Per variant: mean ± 95 % CI (normal approximation over images; images of one scene share a training run, "
        "so the intervals are optimistic). Higher is better except for the leakage columns. `–`: not measured "
        "(multi-concept only on prompts with 2+ concepts; mask IoU only for methods that estimate masks).", "",
        markdown_summary(table),
        "![identity vs prompt fidelity](pareto.png)", "",
        "## By prompt kind", "", tables.markdown_table(kind_rows),
        "## Paper claims on the toy world", "",
        "Each claim compares two variants on the same (scene, prompt, seed) images: Δ = variant − reference, "
        "with the 95 % interval of the paired differences.", "",
        markdown_claims(claims) if claims else "(no claim has both of its variants in this run)\n",
    ]
    if failed:
        lines += ["## Runs without results", ""] + [f"- {r['variant']} / {r['scene']}: {r.get('status')}"
                                                    + (f" — {r['error']}" if r.get("error") else "") for r in failed] + [""]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    return {"table": table, "by_kind": by_kind, "per_scene": per_scene, "claims": claims, "runs": runs,
            "images": image_rows, "masks": mask_rows, "timing": timing,
            "paths": {name: out_dir / name for name in ("results.md", "results.csv", "pareto.png", "claims.csv",
                                                         "images.csv", "timing.json")}}


def _fingerprint(out_dir: Path) -> str:
    try:
        return json.loads((out_dir / "suite.json").read_text()).get("model_fingerprint", "?")
    except (OSError, ValueError):
        return "?"


def _timing_line(t: dict) -> str:
    parts = [f"This invocation: {t.get('runs_done_now', 0)} run(s) in {t.get('wall_s', 0) / 60:.1f} min with "
             f"{t.get('workers')} worker(s)"]
    if t.get("runs_done_now"):
        parts.append(f"run CPU time {t['cpu_s_runs'] / 60:.1f} min ≈ {t['idle_estimate_s'] / 60:.1f} min on "
                     f"{t.get('workers')} idle core(s)")
    parts.append(f"estimate was {t.get('estimate_wall_s', 0) / 60:.1f} min")
    if t.get("load_before") is not None:
        parts.append(f"load average {t['load_before']} → {t.get('load_after')} on {t.get('cores')} cores")
    return "; ".join(parts) + "."


def _write_timing(out_dir: Path, runs: list[dict], timing: dict) -> None:

    ok = [r for r in runs if r.get("status") == "ok"]
    per_method: dict[str, list[dict]] = {}
    for r in ok:
        per_method.setdefault(r["method"], []).append(r)
    timing = dict(timing)
    timing["per_method"] = {
        m: {k: round(sum(r.get(k, 0.0) for r in rs) / len(rs), 2) for k in ("wall_s", "cpu_s", "train_s", "generate_s", "score_s")}
        for m, rs in per_method.items()}
    timing["all_runs_cpu_s"] = round(sum(r.get("cpu_s", 0.0) for r in ok), 1)
    atomic_write_text(out_dir / "timing.json", json.dumps(timing, indent=2) + "\n")

