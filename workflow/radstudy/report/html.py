"""The study report: ONE self-contained HTML file (figures embedded as PNG, tables as HTML).

Sections: study design and patient flow, Table 1, segmentation quality, selected features and model
coefficients (any TSVs given), performance tables (from the evaluation's `manifest.json`), figures per
endpoint and cohort, explanation (SHAP, nomogram), settings and software versions. Every table the report
computes (Table 1, segmentation summary, flow) is also written as CSV and every figure as PNG + PDF into the
evaluation folder. A missing optional input leaves its section with a sentence saying so. The report is a
function of its inputs: no clock, no state kept between reports; what changed since the study's first report
comes from a declared baseline file (`write_baseline`). `radstudy evaluate` writes one from any predictions.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from radstudy.evaluate.performance import format_p as _format_p
from radstudy.statistics.design import COHORTS
from radstudy.tables import read_table

log = logging.getLogger("radstudy.report.html")

ID_COLUMNS = {"patient", "center", "split", "cohort", "has_clinical_record"}

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:auto;padding:0 24px 60px;
color:#222;line-height:1.45}
h1{border-bottom:3px solid #d95f02;padding-bottom:6px} h2{border-bottom:1px solid #ccc;margin-top:42px}
h3{margin-top:28px;color:#333} nav{background:#f6f6f6;padding:8px 14px;border-radius:6px;font-size:14px}
nav a{margin-right:14px} table{border-collapse:collapse;margin:10px 0 18px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap} th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left} .tbl{overflow-x:auto} .note{color:#666;font-size:13px}
.missing{color:#a33;font-style:italic} figure{display:inline-block;margin:10px 12px 18px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:12.5px;color:#444;max-width:720px}
.caption{font-size:13px;color:#444;margin:2px 0}
"""


# --------------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------------

def _is_categorical(s: pd.Series) -> bool:
    if not pd.api.types.is_numeric_dtype(s):
        return True
    return s.dropna().nunique() <= 2


def _normal(groups: list[np.ndarray]) -> bool:
    """Shapiro-Wilk P > 0.05 in every group with 3-5000 values (else treated as non-normal)."""
    for g in groups:
        if len(g) < 3:
            return False
        if stats.shapiro(g[:5000]).pvalue <= 0.05:
            return False
    return True


def format_p(p) -> str:
    """A P value as the report's tables show it (evaluate.performance.format_p; missing: empty)."""
    return _format_p(p, missing="")


def table1(clinical: pd.DataFrame, groups: pd.Series, variables=None, categorical=None) -> pd.DataFrame:
    """Patient characteristics per group (cohort) with tests as the seed studies report them.

    Continuous: mean +- SD and t-test (2 groups) / one-way ANOVA when every group passes Shapiro-Wilk,
    else median [IQR] and Mann-Whitney U / Kruskal-Wallis. Categorical (non-numeric, or at most two values):
    n (%) and chi-square, or Fisher's exact test for 2x2 tables with an expected count below 5.
    """
    data = clinical.copy()
    data["patient"] = data["patient"].astype(str)
    data = data.set_index("patient")
    grp = groups.copy()
    grp.index = grp.index.astype(str)
    data = data.loc[data.index.intersection(grp.index)]
    g = grp.reindex(data.index)
    levels = [c for c in COHORTS if c in set(g)] + sorted(set(g) - set(COHORTS))
    variables = variables or [c for c in data.columns if c not in ID_COLUMNS or (c == "center" and data[c].nunique() > 1)]
    categorical = set(categorical or [])
    header = ["Overall"] + levels
    rows = [{"Variable": "Patients, n", "Level": "", "Overall": str(len(data)),
             **{lv: str(int((g == lv).sum())) for lv in levels}, "P": "", "Test": ""}]
    for var in variables:
        s = data[var]
        missing = int(s.isna().sum())
        if var in categorical or _is_categorical(s):
            s = s.astype("string")
            cats = sorted(s.dropna().unique())
            tab = pd.crosstab(s, g).reindex(index=cats, columns=levels, fill_value=0)
            p, test = np.nan, ""
            if tab.shape[0] > 1 and tab.shape[1] > 1 and tab.values.sum() > 0:
                tab_ok = tab.loc[tab.sum(axis=1) > 0, tab.sum(axis=0) > 0]
                if tab_ok.shape == (2, 2) and (stats.contingency.expected_freq(tab_ok.values) < 5).any():
                    p, test = stats.fisher_exact(tab_ok.values).pvalue, "Fisher"
                elif min(tab_ok.shape) > 1:
                    p, test = stats.chi2_contingency(tab_ok.values, correction=tab_ok.shape == (2, 2))[1], "chi-square"
            total = s.notna().sum()
            rows.append({"Variable": var + (f" (missing {missing})" if missing else ""), "Level": "", "Overall": "",
                         **{lv: "" for lv in levels}, "P": format_p(p), "Test": test})
            for cat in cats:
                n_all = int((s == cat).sum())
                row = {"Variable": "", "Level": str(cat), "Overall": f"{n_all} ({100 * n_all / max(total, 1):.1f}%)",
                       "P": "", "Test": ""}
                for lv in levels:
                    n_lv = int(tab.loc[cat, lv])
                    row[lv] = f"{n_lv} ({100 * n_lv / max(int(tab[lv].sum()), 1):.1f}%)"
                rows.append(row)
        else:
            x = pd.to_numeric(s, errors="coerce")
            parts = [x[g == lv].dropna().values.astype(float) for lv in levels]
            parts_ok = [v for v in parts if len(v)]
            normal = _normal(parts_ok)
            if normal:
                fmt = lambda v: f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""  # noqa: E731
                label, test = "mean ± SD", ("t-test" if len(parts_ok) == 2 else "ANOVA")
                p = (stats.ttest_ind(*parts_ok).pvalue if len(parts_ok) == 2
                     else stats.f_oneway(*parts_ok).pvalue) if len(parts_ok) > 1 else np.nan
            else:
                fmt = (lambda v: f"{np.median(v):.1f} [{np.percentile(v, 25):.1f}, {np.percentile(v, 75):.1f}]"  # noqa: E731
                       if len(v) else "")
                label, test = "median [IQR]", ("Mann-Whitney U" if len(parts_ok) == 2 else "Kruskal-Wallis")
                p = (stats.mannwhitneyu(*parts_ok).pvalue if len(parts_ok) == 2
                     else stats.kruskal(*parts_ok).pvalue) if len(parts_ok) > 1 else np.nan
            rows.append({"Variable": var + (f" (missing {missing})" if missing else ""), "Level": label,
                         "Overall": fmt(x.dropna().values.astype(float)),
                         **{lv: fmt(v) for lv, v in zip(levels, parts)}, "P": format_p(p), "Test": test})
    return pd.DataFrame(rows, columns=["Variable", "Level", *header, "P", "Test"])


# --------------------------------------------------------------------------------------------------
# segmentation quality and patient flow
# --------------------------------------------------------------------------------------------------

def _med_iqr(v: pd.Series) -> str:
    v = v.dropna()
    return f"{v.median():.3f} [{v.quantile(0.25):.3f}, {v.quantile(0.75):.3f}]" if len(v) else ""


def segmentation_summary(dsc: pd.DataFrame) -> pd.DataFrame:
    """Per region (x method x scope, where the table has them: nnU-Net on the whole image, the multitask network
    and nnU-Net in the network's crops) x center (and all centers): DSC mean ± SD and median [IQR], HD95, volumes
    auto vs manual. The crop rows of patients nnU-Net was trained on (nnunet_trained) are left out for both methods:
    nnU-Net has seen their masks, and so has a multitask network that starts from its weights; both are summarised
    on the same patients, which neither was trained on."""
    rows = []
    if "method" in dsc.columns and "nnunet_trained" in dsc.columns:
        trained = dsc["nnunet_trained"].astype(str).str.lower() == "true"
        dsc = dsc[~(trained & (dsc["scope"] == "crop"))]
    by = ["region", "method", "scope"] if {"method", "scope"} <= set(dsc.columns) else ["region"]
    keys = [("all", dsc)] + ([(c, g) for c, g in dsc.groupby("center")] if "center" in dsc.columns else [])
    for group, rg in dsc.groupby(by, sort=True):
        group = dict(zip(by, group if isinstance(group, tuple) else (group,)))
        for center, _ in keys:
            g = rg if center == "all" else rg[rg["center"] == center]
            if g.empty:
                continue
            row = {**group, "center": center, "n": len(g),
                   "DSC mean ± SD": f"{g['dsc'].mean():.3f} ± {g['dsc'].std(ddof=1):.3f}" if len(g) > 1 else f"{g['dsc'].mean():.3f}",
                   "DSC median [IQR]": _med_iqr(g["dsc"])}
            if "hd95" in g.columns:
                row["HD95 mm median [IQR]"] = _med_iqr(g["hd95"])
            if {"volume_auto_ml", "volume_manual_ml"} <= set(g.columns):
                a, m = g["volume_auto_ml"].astype(float), g["volume_manual_ml"].astype(float)
                ok = a.notna() & m.notna()
                if ok.sum() > 2:
                    row["volume auto/manual r"] = f"{np.corrcoef(a[ok], m[ok])[0, 1]:.3f}"
                    row["volume difference % median"] = f"{np.median(100 * (a[ok] - m[ok]) / m[ok].where(m[ok] > 0)):.1f}"
            rows.append(row)
    return pd.DataFrame(rows)


def _figure_file(fig, out_dir: Path, name: str) -> Path:
    from radstudy.figures import save_figure

    return save_figure(fig, out_dir, name)


def plot_segmentation(dsc: pd.DataFrame, out_dir: Path) -> Path:
    """The segmentation stage's figure (radstudy.figures.dsc_figure), saved with the report's figures."""
    from radstudy.figures import dsc_figure

    return _figure_file(dsc_figure(dsc), out_dir, "segmentation_quality")


def plot_flow(flow: pd.DataFrame, cohort_counts: dict, out_dir: Path) -> Path:
    """A CONSORT-like diagram: delivered -> excluded (reasons) -> included -> cohorts."""
    import matplotlib.pyplot as plt

    centers = flow[flow["center"].astype(str) != "total"]
    total = flow[flow["center"].astype(str) == "total"]
    tot = total.iloc[0] if len(total) else centers.sum(numeric_only=True)
    reasons = [c for c in flow.columns if c.startswith("excluded:")]
    fig, ax = plt.subplots(figsize=(9, 5.2))
    ax.axis("off")
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)

    def box(x, y, text, w=4.2, h=1.3, fc="#f5f5f5"):
        ax.add_patch(plt.Rectangle((x - w / 2, y - h / 2), w, h, fc=fc, ec="#444"))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5, wrap=True)

    per_center = ", ".join(f"{r.center}: {int(r.delivered)}" for r in centers.itertuples())
    box(3, 9, f"Patients delivered: {int(tot['delivered'])}\n({per_center})", w=5.6)
    excl = [f"{c.split(':', 1)[1]}: {int(tot[c])}" for c in reasons if tot.get(c, 0)]
    box(7.8, 6.9, f"Excluded: {int(tot.get('excluded', 0))}\n" + "\n".join(excl[:6]), w=3.8,
        h=1.2 + 0.25 * min(len(excl), 6), fc="#fbeaea")
    box(3, 5, f"Included: {int(tot['included'])}", w=4.0, fc="#eaf3fb")
    ax.annotate("", xy=(3, 5.65), xytext=(3, 8.35), arrowprops={"arrowstyle": "->"})
    ax.annotate("", xy=(5.9, 6.9), xytext=(3, 6.9), arrowprops={"arrowstyle": "->"})
    if cohort_counts:
        xs = np.linspace(1.5, 8.5, len(cohort_counts))
        for x, (c, n) in zip(xs, cohort_counts.items()):
            box(x, 1.6, f"{c}\nn = {n}", w=2.2, h=1.1, fc="#eef7ee")
            ax.annotate("", xy=(x, 2.15), xytext=(3, 4.35), arrowprops={"arrowstyle": "->", "color": "#666"})
    return _figure_file(fig, out_dir, "patient_flow")


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# What changed: this report's centers against the study's baseline (its first report's patient flow)
# --------------------------------------------------------------------------------------------------
BASELINE_COLUMNS = ["center", "role", "delivered", "included", "excluded"]
HISTORY_COLUMNS = ["reported", *BASELINE_COLUMNS]


def center_rows(flow: pd.DataFrame) -> pd.DataFrame:
    """One row per center of a patient-flow table (center, role, delivered, included, excluded)."""
    rows = flow[flow["center"].astype(str) != "total"].copy()
    rows["center"] = rows["center"].astype(str)
    for c in ("delivered", "included", "excluded"):
        rows[c] = pd.to_numeric(rows.get(c, 0), errors="coerce").fillna(0).astype(int)
    rows["role"] = rows.get("role", pd.Series("", index=rows.index)).fillna("").astype(str)
    return rows[BASELINE_COLUMNS].reset_index(drop=True)


def write_baseline(flow_tsv, out_tsv) -> pd.DataFrame:
    """The study's baseline: each center's role and patient counts from a patient-flow table. The workflow writes
    it once, from the first run's patient flow (rule report_baseline), and every later report says what changed
    since: a declared file, so the report stays a function of its inputs (delete it to start a new baseline)."""
    rows = center_rows(_read(flow_tsv))
    Path(out_tsv).parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out_tsv, sep="\t", index=False)
    return rows


def study_changes(flow: pd.DataFrame, baseline: pd.DataFrame | None) -> list[str]:
    """Sentences saying what changed between the study's baseline (`write_baseline`: centers, roles, patient
    counts of its first report) and this report's patient flow; [] without a baseline."""
    if baseline is None:
        return []
    current = center_rows(flow).set_index("center")
    previous = baseline.astype({"center": str}).set_index("center")
    previous["role"] = previous["role"].fillna("").astype(str)
    changes = []
    for c in current.index:
        r = current.loc[c]
        if c not in previous.index:
            role = "an external test center" if r["role"] == "external" else f"a {r['role']} center"
            changes.append(f"Center {c} added as {role}: {r['delivered']} patient(s) delivered, "
                           f"{r['included']} included.")
            continue
        p = previous.loc[c]
        if str(p["role"]) != r["role"]:
            changes.append(f"Center {c} changed role: {p['role']} -> {r['role']}.")
        for k in ("delivered", "included"):
            if int(p[k]) != int(r[k]):
                changes.append(f"Center {c}: {k} patients {int(p[k])} -> {int(r[k])}.")
    for c in previous.index:
        if c not in current.index:
            changes.append(f"Center {c} ({previous.loc[c, 'role']}) is no longer in the study.")
    if not changes:
        return [f"Same centers and patient counts as at the study's first report (baseline.tsv): {len(current)} "
                f"center(s), {int(current['included'].sum())} patient(s) included."]
    return ["Changes since the study's first report (baseline.tsv):", *changes]


def study_history(flow: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """The baseline's centers and this report's, one row per center and report."""
    return pd.concat([baseline.assign(reported="first report"), center_rows(flow).assign(reported="this report")],
                     ignore_index=True)[HISTORY_COLUMNS]


def _p_column(name: str) -> bool:
    n = name.lower()
    return n == "p" or n.endswith("_p") or n in ("p_value", "pvalue", "hl_p", "logrank_p")


def html_table(df: pd.DataFrame, max_rows: int = 400, digits: int = 3) -> str:
    """A DataFrame as an HTML table: P values as '<0.001', floats to `digits` decimals."""
    if df is None or df.empty:
        return '<p class="missing">Empty table.</p>'
    shown = df.head(max_rows).copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            if _p_column(str(col)):
                shown[col] = shown[col].map(format_p)
            elif shown[col].dropna().map(float.is_integer).all():  # counts, horizons read back as floats
                shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
            else:
                shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else (f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"))
    note = f'<p class="note">First {max_rows} of {len(df)} rows; the CSV has all.</p>' if len(df) > max_rows else ""
    return '<div class="tbl">' + shown.to_html(index=False, escape=True, na_rep="", border=0) + "</div>" + note


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _png_width(path: Path) -> int:
    head = Path(path).read_bytes()[:24]
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 900


def _figure_html(path: Path, caption: str) -> str:
    # shown at 2/3 of the 150-dpi pixel size (about the size on paper), never wider than the page
    width = int(_png_width(path) * 2 / 3)
    return (f'<figure style="width:{width}px;max-width:100%"><img src="{_img(path)}" alt="{html.escape(caption)}" '
            f'style="width:100%"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _read(path) -> pd.DataFrame:
    return read_table(path, id_columns=())  # 'NA' and empty cells missing; identifiers as written


def _versions() -> str:
    from radstudy import __version__

    names = ["numpy", "scipy", "pandas", "scikit-learn", "scikit-survival", "lifelines", "shap",
             "dcurves", "matplotlib"]
    found = [f"radstudy {__version__}"]  # from the package itself: per-rule envs do not install it
    for n in names:
        try:
            found.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _exclusions_html(manifest: dict, tables: dict) -> str:
    """What the evaluation left out: predictions with a missing score or outcome (counted per cohort and model in
    exclusions.csv), or a sentence saying that none was."""
    rows = pd.DataFrame(manifest.get("exclusions", []))
    if rows.empty:
        return '<p class="note">No prediction was left out for a missing score, outcome, time or event.</p>'
    path = tables.get("exclusions", {}).get("path", "exclusions.csv")
    return (f'<h3>Predictions left out</h3><p class="missing">{int(rows["n_excluded"].sum())} prediction(s) were left '
            f'out for a missing value; the numbers of patients (n) in the tables below count those evaluated. '
            f'CSV: {html.escape(path)}</p>' + html_table(rows))


def _groups_for_table1(evaluation_dir: Path, cohorts_tsv) -> pd.Series | None:
    """patient -> cohort of the first split, from a cohorts table or the evaluation's cohorts.csv."""
    src = Path(cohorts_tsv) if cohorts_tsv else evaluation_dir / "cohorts.csv"
    if not src.is_file():
        return None
    c = _read(src)
    if "split" in c.columns:
        first = sorted(c["split"].unique(), key=str)[0]
        c = c[c["split"] == first]
    c["patient"] = c["patient"].astype(str)
    return c.drop_duplicates("patient").set_index("patient")["cohort"]


def delivery_html(patients_tsv, ev: Path) -> str:
    """Per center, the manual masks by source (label map, RTSTRUCT, SEG) and the delivered files not used; the
    patients whose mask was combined from several regions, chosen among them or drawn on another series. Written
    to delivery.csv and mask_notes.csv."""
    if not patients_tsv or not Path(patients_tsv).is_file():
        return ""
    patients = pd.read_csv(patients_tsv, sep="\t", dtype=str, keep_default_na=False)
    if "mask_source" not in patients:
        return ""
    sources = sorted(s for s in set(patients["mask_source"]) if s not in ("", "none"))
    rows = []
    for center, group in patients.groupby("center", sort=True):
        row = {"center": center, "patients": len(group)}
        row.update({f"mask: {s}": int((group["mask_source"] == s).sum()) for s in sources})
        row["no manual mask"] = int(group["mask_source"].isin(["none", ""]).sum())
        row["files delivered, not used"] = int(pd.to_numeric(group["unused_files"], errors="coerce").fillna(0).sum())
        rows.append(row)
    delivery = pd.DataFrame(rows)
    delivery.to_csv(ev / "delivery.csv", index=False)
    content = ('<h3>Delivered masks and files</h3><p class="caption">Manual masks by source; files in the patients\' '
               'folders that nothing used (other series, other structure sets, documents) are listed per patient in '
               'results/ingest/{center}/{patient}/qc.json (unused_files). CSV: delivery.csv</p>' + html_table(delivery))
    # the study's tables write a missing value as NA (radstudy.tables): a patient without a note is not listed
    notes = patients.loc[~patients["mask_notes"].isin(["", "NA"]), ["patient", "center", "mask_source", "mask_notes"]]
    if len(notes):
        notes.to_csv(ev / "mask_notes.csv", index=False)
        content += ('<p class="caption">Masks combined from several regions, chosen among them '
                    '(ingest.masks.multiple_matches) or drawn on another series (ingest.masks.other_series). '
                    'CSV: mask_notes.csv</p>' + html_table(notes))
    return content


# --------------------------------------------------------------------------------------------------
# End-to-end networks (results/networks): learning curves and saliency maps
# --------------------------------------------------------------------------------------------------
NETWORK_HISTORY_COLUMNS = ["split", "endpoint", "model", "epoch", "train_loss", "inner_loss", "inner_metric", "seconds",
                   "best_epoch"]
SALIENCY_INDEX_COLUMNS = ["file", "patient", "cohort", "split", "endpoint", "model", "score"]


def _inner_metric(endpoint: str) -> str:
    if endpoint == "multitask":  # the survival head's C (the binary head's AUC when there is no survival endpoint)
        return "C (AUC)"
    return "AUC" if endpoint == "binary" else "Harrell's C"


def plot_learning_curves(history: pd.DataFrame, endpoint: str, out_dir: Path) -> Path:
    """The learning curves of one endpoint, a panel per model: per split (one colour each) the training loss
    (solid) and the inner-validation loss (dashed) by epoch, the inner-validation metric on the right axis (dotted),
    the chosen epoch as a circle on the inner-validation loss. Saved as learning_curves_{endpoint}."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = history[history["endpoint"] == endpoint]
    models, splits = list(dict.fromkeys(runs["model"])), list(dict.fromkeys(runs["split"]))
    metric = _inner_metric(endpoint)
    # a row of panels, one per model, and a strip below for the legend (laid out by save_figure's tight_layout)
    fig, axes = plt.subplot_mosaic([list(range(len(models))), ["legend"] * len(models)],
                                   figsize=(5.4 * len(models), 4.6), height_ratios=[1, 0.16])
    for i, model in enumerate(models):
        ax = axes[i]
        right = ax.twinx()
        for k, split in enumerate(splits):
            run = runs[(runs["model"] == model) & (runs["split"] == split)].sort_values("epoch")
            colour = f"C{k % 10}"
            ax.plot(run["epoch"], run["train_loss"], color=colour, lw=1.3)
            ax.plot(run["epoch"], run["inner_loss"], color=colour, lw=1.3, ls="--")
            right.plot(run["epoch"], run["inner_metric"], color=colour, lw=0.9, ls=":")
            if "inner_dice" in run and run["inner_dice"].notna().any():  # the multitask network's segmentation
                right.plot(run["epoch"], run["inner_dice"], color=colour, lw=0.9, ls="-.")
            chosen = run[run["epoch"] == run["best_epoch"]]
            ax.plot(chosen["epoch"], chosen["inner_loss"], "o", color=colour, mfc="white", ms=7, mew=1.5)
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.25)
        right.set_ylim(0, 1)
        right.set_ylabel(f"inner-validation {metric}" + (", Dice" if "inner_dice" in runs
                                                           and runs["inner_dice"].notna().any() else ""))
    handles = [Line2D([], [], color="black", lw=1.3, label="training loss"),
               Line2D([], [], color="black", lw=1.3, ls="--", label="inner-validation loss"),
               Line2D([], [], color="black", lw=0.9, ls=":", label=f"inner-validation {metric}"),
               Line2D([], [], color="black", marker="o", mfc="white", ls="", label="chosen epoch")]
    if "inner_dice" in runs and runs["inner_dice"].notna().any():
        handles.insert(3, Line2D([], [], color="black", lw=0.9, ls="-.", label="inner-validation Dice"))
    if len(splits) <= 10:  # one colour per split; more splits repeat the colours and get no legend entry
        handles += [Line2D([], [], color=f"C{k}", lw=3, label=f"split {split}") for k, split in enumerate(splits)]
    axes["legend"].axis("off")
    axes["legend"].legend(handles=handles, loc="center", ncol=min(len(handles), 1 + 2 * len(models)), fontsize=8,
                          frameon=False)
    fig.suptitle("Learning curves, multitask network (both endpoints)" if endpoint == "multitask"
                 else f"Learning curves, {endpoint} endpoint")
    return _figure_file(fig, out_dir, f"learning_curves_{endpoint}")


def _read_networks_table(path: Path, columns: list[str], id_columns: tuple[str, ...]) -> pd.DataFrame | None:
    """A table of the networks folder (None: absent or empty); a missing column fails naming the file."""
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return None
    table = read_table(path, id_columns=id_columns)
    lacking = [c for c in columns if c not in table.columns]
    if lacking:
        raise ValueError(f"{path} lacks the column(s) {', '.join(lacking)} (expected: {', '.join(columns)})")
    return table if len(table) else None


def _training_summary(history: pd.DataFrame) -> pd.DataFrame:
    """Per split, endpoint and model: epochs run, the chosen epoch, its inner-validation loss and metric, seconds."""
    rows = []
    for (split, endpoint, model), run in history.groupby(["split", "endpoint", "model"], sort=False):
        chosen = run[run["epoch"] == run["best_epoch"]]
        rows.append({"split": split, "endpoint": endpoint, "model": model, "epochs": len(run),
                     "chosen epoch": int(run["best_epoch"].iloc[0]),
                     "inner-validation loss": float(chosen["inner_loss"].iloc[0]) if len(chosen) else np.nan,
                     "inner-validation metric": float(chosen["inner_metric"].iloc[0]) if len(chosen) else np.nan,
                     "metric": _inner_metric(str(endpoint)), "seconds": float(run["seconds"].sum())})
    return pd.DataFrame(rows)


def _saliency_html(saliency_dir: Path) -> str:
    """The saliency maps (saliency/*.png) as a grid, captioned from saliency/index.tsv (patient pseudonym, cohort,
    score); a file the index names but that is absent is said so, a PNG the index does not name is shown by name."""
    index = _read_networks_table(saliency_dir / "index.tsv", SALIENCY_INDEX_COLUMNS, ("patient", "split", "cohort"))
    index = pd.DataFrame(columns=SALIENCY_INDEX_COLUMNS) if index is None else index
    content = []
    for (endpoint, model), rows in index.groupby(["endpoint", "model"], sort=False):
        figures = []
        for row in rows.itertuples():
            caption = f"{row.patient}, {row.cohort} cohort, score {row.score:.2f} (split {row.split})"
            png = saliency_dir / str(row.file)
            figures.append(_figure_html(png, caption) if png.is_file() else _missing(f"{caption}: {png} not found."))
        content.append(f"<h4>{html.escape(str(model))}, {html.escape(str(endpoint))} endpoint</h4>" + "".join(figures))
    others = sorted(p for p in saliency_dir.glob("*.png") if p.name not in set(index["file"].astype(str)))
    if others:
        content.append("<h4>Other maps</h4>" + "".join(_figure_html(p, p.stem) for p in others))
    return "".join(content)


def networks_html(networks_dir, ev: Path) -> str:
    """The end-to-end networks' section (results/networks): the training summary (networks_training.csv), the
    learning curves per endpoint (figures learning_curves_{endpoint}) and the saliency maps; "" when the folder has
    neither a history nor a saliency map."""
    if not networks_dir or not Path(networks_dir).is_dir():
        return ""
    folder = Path(networks_dir)
    history = _read_networks_table(folder / "history.tsv", NETWORK_HISTORY_COLUMNS, ("split",))
    saliency = _saliency_html(folder / "saliency") if (folder / "saliency").is_dir() else ""
    if history is None and not saliency:
        return ""
    content = []
    if history is not None:
        summary = _training_summary(history)
        summary.to_csv(ev / "networks_training.csv", index=False)
        content.append("<h3>Learning curves</h3><p>Early stopping used an inner split of each training partition "
                       "only: the epoch kept (circle) has the lowest loss on those held-out training patients, and "
                       "no validation or test patient took part in training or in choosing it.</p>")
        for endpoint in dict.fromkeys(history["endpoint"]):
            content.append(_figure_html(plot_learning_curves(history, endpoint, ev),
                                        f"Learning curves of the {endpoint} endpoint per model and split: training "
                                        f"and inner-validation loss, inner-validation {_inner_metric(endpoint)}."))
        content.append('<p class="caption">Per split, endpoint and model: the chosen epoch and its inner-validation '
                       'loss and metric. CSV: networks_training.csv</p>' + html_table(summary))
    if saliency:
        content.append('<h3>Saliency maps</h3><p class="caption">Grad-CAM over the crop of a few patients per cohort: '
                       'the voxels that raise the network\'s score most (1), on the region\'s largest axial slice, '
                       'with its contour where the region is an input channel.</p>' + saliency)
    return "".join(content)


def write_report(evaluation_dir, out_html, *, study_name: str = "radstudy", design_text: str | None = None,
                 flow_tsv=None, clinical_tsv=None, cohorts_tsv=None, dsc_tsv=None, extra_tables=(),
                 coefficients_tsv=None, table1_variables=None, table1_categorical=None, baseline_tsv=None,
                 patients_tsv=None, networks_dir=None) -> Path:
    """Write the single-file HTML report of an evaluation folder (see module docstring).

    extra_tables: TSV/CSV paths (selected features, coefficients, ...) or {title: path}, shown as tables.
    baseline_tsv: the study's baseline (`write_baseline`); the patient-flow section says what changed since.
    patients_tsv: the study's patient table (results/qc/patients.tsv): where each manual mask came from, what was
    combined or chosen, and how many delivered files were not used.
    networks_dir: the end-to-end networks' folder (results/networks: history.tsv, saliency/*.png and index.tsv);
    its learning curves and saliency maps get a section when it has them.
    A function of its inputs: no clock, no state kept between reports (same inputs, same bytes).
    """
    ev = Path(evaluation_dir)
    ev.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((ev / "manifest.json").read_text()) if (ev / "manifest.json").is_file() else None
    settings = (manifest or {}).get("settings", {})
    figures = (manifest or {}).get("figures", [])
    tables = (manifest or {}).get("tables", {})
    toc, body = [], []

    def section(anchor: str, title: str, content: str):
        toc.append(f'<a href="#{anchor}">{html.escape(title)}</a>')
        body.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{content}')

    def figs(select) -> str:
        chosen = [f for f in figures if select(f) and (ev / f["png"]).is_file()]
        # the Kaplan-Meier curves within clinical subgroups right after the cohort's Kaplan-Meier figure
        chosen.sort(key=lambda f: {"km": 0, "km_subgroup": 1}.get(f.get("kind"), 2))
        return "".join(_figure_html(ev / f["png"], f["caption"]) for f in chosen)

    def manifest_table(name: str) -> str:
        t = tables.get(name)
        if not t or not (ev / t["path"]).is_file():
            return ""
        return f'<h3>{html.escape(t["title"])}</h3><p class="caption">CSV: {html.escape(t["path"])}</p>' + \
            html_table(pd.read_csv(ev / t["path"]))

    # study design ------------------------------------------------------------------------------
    parts = []
    if design_text:
        parts.append("".join(f"<p>{html.escape(p)}</p>" for p in design_text.strip().split("\n\n")))
    if settings:
        parts.append("<ul>" + "".join(f"<li><b>{html.escape(k.replace('_', ' '))}</b>: {html.escape(str(v))}</li>"
                                      for k, v in settings.items()) + "</ul>")
    if not parts:
        parts.append(_missing("No study design description and no evaluation settings were provided."))
    section("design", "Study design", "".join(parts))

    # patient flow --------------------------------------------------------------------------------
    groups = _groups_for_table1(ev, cohorts_tsv)
    if flow_tsv and Path(flow_tsv).is_file():
        flow = _read(flow_tsv)
        flow.to_csv(ev / "patient_flow.csv", index=False)
        counts = groups.value_counts().reindex([c for c in COHORTS if c in set(groups)] +
                                               sorted(set(groups) - set(COHORTS))).to_dict() if groups is not None else {}
        content = html_table(flow)
        try:
            content = _figure_html(plot_flow(flow, counts, ev), "Patient flow (delivered, excluded with reasons, "
                                   "included, cohorts of the first split).") + content
        except Exception as exc:  # a diagram must not cost the report; the table stays
            log.warning("patient-flow diagram not drawn: %s", exc)
        baseline = pd.read_csv(baseline_tsv, sep="\t", dtype={"center": str}, keep_default_na=False) \
            if baseline_tsv else None
        changes = study_changes(flow, baseline)
        content = "".join(f"<p>{html.escape(c)}</p>" for c in changes) + content
        if len(changes) > 1:
            history = study_history(flow, baseline)
            history.to_csv(ev / "study_history.csv", index=False)
            content += ('<h3>Study history</h3><p class="caption">Centers at the study\'s first report and at this '
                        'one (CSV: study_history.csv)</p>' + html_table(history))
        content += delivery_html(patients_tsv, ev)
        section("flow", "Patient flow", content)
    else:
        section("flow", "Patient flow", _missing("No patient-flow table (results/qc/patient_flow.tsv) was provided."))

    # Table 1 ---------------------------------------------------------------------------------------
    if clinical_tsv and Path(clinical_tsv).is_file() and groups is not None:
        t1 = table1(_read(clinical_tsv), groups, table1_variables, table1_categorical)
        t1.to_csv(ev / "table1.csv", index=False)
        section("table1", "Table 1: patient characteristics",
                '<p class="caption">Per cohort (first split). Continuous: mean ± SD with t-test/ANOVA when normal '
                '(Shapiro-Wilk), else median [IQR] with Mann-Whitney U/Kruskal-Wallis; categorical: n (%) with '
                'chi-square or Fisher. CSV: table1.csv</p>' + html_table(t1))
    else:
        why = "no clinical table" if not (clinical_tsv and Path(clinical_tsv).is_file()) else "no cohort assignment"
        section("table1", "Table 1: patient characteristics", _missing(f"Not available: {why} was provided."))

    # segmentation ----------------------------------------------------------------------------------
    if dsc_tsv and Path(dsc_tsv).is_file() and _read(dsc_tsv).empty:
        section("segmentation", "Segmentation quality", _missing(
            "No automatic segmentation was evaluated: no holdout patient with a manual mask, or the study's masks are "
            "the delivered manual masks (segmentation.method manual; see the design)."))
    elif dsc_tsv and Path(dsc_tsv).is_file():
        dsc = _read(dsc_tsv)
        summary = segmentation_summary(dsc)
        summary.to_csv(ev / "segmentation_quality.csv", index=False)
        content = html_table(summary)
        try:
            content = _figure_html(plot_segmentation(dsc, ev), "Dice similarity coefficient of the automatic "
                                   "segmentation against the manual masks per region and center; volumes."
                                   + (" Multitask rows: the network's mask in its crop and nnU-Net's on the same "
                                      "crop, for the annotated patients held out of the network's training "
                                      "(every cohort but training; the table: those nnU-Net was not trained on)."
                                      if "method" in dsc.columns and (dsc["method"] == "multitask").any()
                                      else "")) + content
        except Exception as exc:
            log.warning("segmentation figure not drawn: %s", exc)
        section("segmentation", "Segmentation quality", content)
    else:
        section("segmentation", "Segmentation quality", _missing("No segmentation evaluation (dsc.tsv) was provided."))

    # features and coefficients ---------------------------------------------------------------------
    items = list(extra_tables.items()) if isinstance(extra_tables, dict) else [(Path(p).stem, p) for p in extra_tables]
    if coefficients_tsv:
        items.append(("model coefficients", coefficients_tsv))
    content = []
    for title, path in items:
        if path and Path(path).is_file():
            content.append(f"<h3>{html.escape(str(title).replace('_', ' '))}</h3>"
                           f'<p class="caption">{html.escape(str(path))}</p>' + html_table(_read(path)))
        else:
            content.append(_missing(f"{title}: file {path} not found."))
    section("models", "Selected features and model coefficients",
            "".join(content) if content else _missing("No feature-selection or coefficient tables were provided."))

    # performance -------------------------------------------------------------------------------------
    if manifest is None:
        section("performance", "Model performance", _missing(f"No evaluation found ({ev / 'manifest.json'})."))
    else:
        perf = [_exclusions_html(manifest, tables)]
        for ep in settings.get("endpoints", []):
            perf.append(f"<h3>{'Binary endpoint' if ep == 'binary' else 'Time-to-event endpoint'}</h3>")
            perf.append(manifest_table(f"summary_{ep}"))
            perf.append(manifest_table(f"comparisons_{ep}"))
            if ep == "survival":
                perf.append(manifest_table("km_subgroups"))
        perf += [manifest_table("summary_reclassification"), manifest_table("cutoffs")]
        rest = [n for n in tables if n.startswith(("metrics_", "summary_")) and n.endswith(("_splits",))]
        perf += [manifest_table(n) for n in rest]
        perf.append('<p class="note">All tables: ' + ", ".join(html.escape(t["path"]) for t in tables.values()) + "</p>")
        section("performance", "Model performance", "".join(perf))

        for ep in settings.get("endpoints", []):
            content = []
            for c in settings.get("cohorts", []):
                block = figs(lambda f, c=c, ep=ep: f.get("section") == ep and f.get("cohort") == c)
                if block:
                    content.append(f"<h3>{html.escape(c)} cohort</h3>{block}")
            title = "Figures: binary endpoint" if ep == "binary" else "Figures: time-to-event endpoint"
            section(f"figures_{ep}", title, "".join(content) or _missing("No figures were drawn."))
        block = figs(lambda f: f.get("section") == "explain")
        explain_tables = "".join(manifest_table(n) for n in tables if n.startswith(("shap_importance", "nomogram_")))
        section("explain", "Explanation: SHAP and nomogram",
                (block + explain_tables) or _missing("No combined-model coefficients and design matrix were given: "
                                                     "no SHAP or nomogram."))

    networks = networks_html(networks_dir, ev)
    if networks:
        section("networks", "End-to-end networks", networks)

    section("software", "Software", f"<p>{html.escape(_versions())}</p>")
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(study_name)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(study_name)}: study report</h1>"
           f"<nav>{''.join(toc)}</nav>{''.join(body)}</body></html>")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(doc, encoding="utf-8")
    return out_html
