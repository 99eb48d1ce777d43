"""The report on real digits runs: files, embedded PNGs, numbers read straight from the runs, escaping.

Three short digits runs (full, LoRA, LoFT) are trained once per module. A hostile copy renames the LoRA run
and a layer to strings that would inject HTML, break a Markdown table and break matplotlib's mathtext.
The browser tests render the page in Debian's headless chromium and skip where it is not installed.
"""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file

from loft_probe import load_run
from loft_probe.comparison import compare
from loft_probe.diagnosis import diagnose
from loft_probe.reporting import figures, report
from loft_probe.reporting.build import FINDINGS_COLUMNS
from loft_probe.reporting.frames import run_frame
from loft_probe.reporting.page import CSP, html_table, md_table
from loft_probe.run import RUN_LAYER, Run, write_metrics_part, write_snapshot
from loft_probe.runner import RunConfig
from loft_probe.runner import run as train
from loft_probe.summary import RUN_TABLE_COLUMNS, run_headline, run_table

METHODS = ("full", "lora", "loft")
FIGURES = ("loss", "angle_heatmap", "shadow_heatmap", "moments", "phi_grid", "residuals", "intruders")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE_NAME = "<script>alert(1)</script>|lora"
# "$\frac$" is a mathtext formula matplotlib cannot parse: drawn unescaped, the figure would fail.
HOSTILE_LAYER = "fc1<script>alert(1)</script>|$\\frac$`x`"
# A test-only probe for the browser: on load, records the images and whether every one decoded.
PROBE = ("<script>window.addEventListener('load', () => { const images = [...document.images];"
         " document.body.dataset.images = images.length;"
         " document.body.dataset.loaded = images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);"
         " });</script>")


@pytest.fixture(scope="module")
def run_dirs(digits_run_dirs) -> Path:
    return digits_run_dirs  # the session's digits runs (conftest.py), in METHODS order


@pytest.fixture(scope="module")
def runs(run_dirs):
    return [load_run(run_dirs / method) for method in METHODS]


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory) -> Path:
    return report(runs, tmp_path_factory.mktemp("report") / "out")


def rewrite(src: Path, dst: Path, *, name: str | None = None, layers: dict[str, str]) -> Path:
    """A copy of a run directory with its name and some layer names replaced, in meta, metrics and snapshots."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["name"] = name or meta["name"]
    meta["layers"] = [dict(layer, name=layers.get(layer["name"], layer["name"])) for layer in meta["layers"]]
    (dst / "meta.json").write_text(json.dumps(meta))
    metrics = load_run(src).metrics
    shutil.rmtree(dst / "metrics")
    write_metrics_part(dst, [(int(r.step), layers.get(r.layer, r.layer), r.metric, float(r.value))
                             for r in metrics.itertuples(index=False)])
    for path in sorted((dst / "snapshots").iterdir()):
        step = int(path.stem.split("-")[1])
        tensors = {}
        for key, tensor in load_file(str(path)).items():
            layer, _, what = key.rpartition("::")
            tensors[f"{layers.get(layer, layer)}::{what}"] = tensor
        write_snapshot(dst, step, tensors)
    return dst


@pytest.fixture(scope="module")
def hostile(run_dirs, tmp_path_factory) -> tuple[list, Path]:
    root = tmp_path_factory.mktemp("hostile")
    runs = [load_run(rewrite(run_dirs / method, root / method, name=HOSTILE_NAME if method == "lora" else None,
                             layers={"fc1": HOSTILE_LAYER}))
            for method in METHODS]
    return runs, report(runs, root / "report", layer=HOSTILE_LAYER)


class Tables(HTMLParser):
    """The text of every table cell, per table and row; and every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: Path) -> Tables:
    parser = Tables()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def last_value(run, metric: str) -> float:
    rows = run.metrics[(run.metrics["metric"] == metric) & (run.metrics["layer"] == RUN_LAYER)]
    return float(rows.loc[rows["step"].idxmax(), "value"])


def late_value(run, metric: str) -> float:
    """The oracle of the summary rule for a run-level metric: the median over its last third of steps."""
    rows = run.metrics[(run.metrics["metric"] == metric) & (run.metrics["layer"] == RUN_LAYER)]
    steps = sorted(set(rows["step"]))
    late = steps[len(steps) - -(-len(steps) // 3):]  # the last ceil(n/3) steps
    return float(np.median(rows.loc[rows["step"].isin(late), "value"]))


def md_cells(line: str) -> list[str]:
    """Cells of a Markdown table row, split on unescaped pipes only."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


# ---------------------------------------------------------------------------------------------- files
def test_writes_both_pages_and_every_figure(built):
    assert built.name == "report.html" and built.is_file()
    assert (built.parent / "report.md").is_file()
    assert sorted(p.stem for p in (built.parent / "figures").iterdir()) == sorted(FIGURES)
    assert "Not drawn" not in built.read_text(encoding="utf-8")


def test_every_html_image_is_an_embedded_png(built):
    images = parse(built).images
    assert len(images) == len(FIGURES)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_MAGIC)


def test_html_is_self_contained(built):
    text = built.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:image/png;base64,)""", text)
    assert built.stat().st_size < 3 * 2**20


def test_markdown_links_every_figure_file(built):
    md = (built.parent / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"figures/{key}.png" for key in FIGURES)
    for link in links:
        assert (built.parent / link).read_bytes().startswith(PNG_MAGIC)


def test_findings_table_diagnoses_every_run_against_the_reference(runs, built):
    """The page carries `loft-probe diagnose` of each run: the adapters against the full run, which is diagnosed
    alone; the same findings the library gives."""
    md = (built.parent / "report.md").read_text(encoding="utf-8")
    section = md.split("## Findings")[1].split("## ")[0]
    rows = [[cell.strip().replace("\\", "") for cell in md_cells(line)]
            for line in section.splitlines() if line.startswith("|")][2:]
    full = next(run for run in runs if run.method == "full")
    for run in runs:
        expected = diagnose(run, reference=None if run is full else full) or [None]
        mine = [row for row in rows if row[0] == run.name]
        assert [row[2] for row in mine] == [f.code if f else "" for f in expected]
    assert any(row[2] == "loss_gap" for row in rows)  # an adapter was compared with the reference


def test_same_runs_same_pages(runs, built, tmp_path):
    again = report(runs, tmp_path / "again")
    strip = lambda text: re.sub(r"base64,[A-Za-z0-9+/=]+", "", text)  # noqa: E731 (PNG bytes may differ)
    assert strip(again.read_text(encoding="utf-8")) == strip(built.read_text(encoding="utf-8"))
    assert (again.parent / "report.md").read_text() == (built.parent / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- numbers
def test_summary_reads_the_runs(runs):
    table = run_table(runs, compare(runs))
    assert list(table.columns) == list(RUN_TABLE_COLUMNS)
    assert list(table["run"]) == list(METHODS) and list(table["method"]) == list(METHODS)
    for row, run in zip(table.itertuples(index=False), runs, strict=True):
        assert row.loss == pytest.approx(late_value(run, "loss"), rel=1e-12)
        assert row.loss != last_value(run, "loss")  # the late median, not the last (noisy) step
        numbers = run_headline(run)  # `loft-probe run`'s table: the same rule, the same numbers
        assert (row.loss, row.shadow_update_cosine) == (numbers["loss"], numbers["update_cosine"])
        assert row.eval_accuracy == last_value(run, "eval_accuracy")
        assert row.eval_loss == last_value(run, "eval_loss")
        assert row.steps == 30
    full, lora, loft = table.itertuples(index=False)
    assert full.angle_left_max_deg != full.angle_left_max_deg  # NaN: the reference is not compared with itself
    for row in (lora, loft):
        assert 0.0 <= row.angle_left_max_deg <= 90.0 and -1.0 <= row.delta_cosine <= 1.0
    assert full.shadow_update_cosine == pytest.approx(1.0, abs=1e-4)  # full fine-tuning is its own shadow


def test_summary_without_comparison_leaves_its_columns_empty(runs):
    table = run_table(runs[1:2], None)
    assert table["angle_left_max_deg"].isna().all() and table["delta_cosine"].isna().all()
    assert table["loss"].iloc[0] == pytest.approx(late_value(runs[1], "loss"), rel=1e-12)


def test_summary_rank_of_attached_runs_comes_from_their_layers():
    """Runs probed through attach (a PEFT model) record no meta rank: the layer table's LoRA ranks stand in."""
    def attached(name: str, ranks: list[int | None]) -> Run:
        layers = [{"name": f"l{i}", "shape": [32, 32], "kind": "full" if r is None else "lora", "rank": r}
                  for i, r in enumerate(ranks)]
        metrics = pd.DataFrame({"step": [1], "layer": [RUN_LAYER], "metric": ["loss"], "value": [0.5]})
        return Run(Path(name), {"name": name, "method": "other" if None in ranks else "lora", "layers": layers},
                   metrics)

    runs = [attached("same", [8, 8]), attached("mixed", [16, 4, 8]), attached("full", [None, None])]
    runs.append(Run(Path("runner"), {**runs[1].meta, "name": "runner", "rank": 2}, runs[1].metrics))
    table = run_table(runs, None)
    assert table["rank"].tolist()[:2] == [8, "4–16"] and table["rank"].tolist()[3] == 2  # meta's rank wins
    assert table["rank"].isna().tolist() == [False, False, True, False]
    assert [row.split(" | ")[2] for row in md_table(table).splitlines()[2:]] == ["8", "4–16", "—", "2"]
    assert "<td class=\"text\">4–16</td>" in html_table(table)


def test_html_summary_shows_the_runs_numbers(runs, built):
    header, *rows = parse(built).tables[0]
    assert header == list(RUN_TABLE_COLUMNS)
    for cells, run in zip(rows, runs, strict=True):
        shown = dict(zip(header, cells, strict=True))
        assert shown["run"] == run.name
        assert float(shown["loss"]) == pytest.approx(late_value(run, "loss"), rel=5e-4)  # 4 digits shown
        for metric in ("eval_loss", "eval_accuracy"):
            assert float(shown[metric]) == pytest.approx(last_value(run, metric), rel=5e-4)


# ---------------------------------------------------------------------------------------------- escaping
def test_hostile_strings_are_escaped_in_html(hostile):
    runs, page = hostile
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;|lora" in text
    assert "Not drawn" not in text  # the "$" in the layer name reached matplotlib escaped
    summary = parse(page).tables[0]
    assert [row[0] for row in summary[1:]] == ["full", HOSTILE_NAME, "loft"]  # one cell each, as text


def test_hostile_strings_are_escaped_in_markdown(hostile):
    _, page = hostile
    md = (page.parent / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in md and "</script>" not in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    widths = {len(md_cells(line)) for line in table}
    # the summary, the findings and the runs table; no cell split by a "|"
    assert widths == {len(RUN_TABLE_COLUMNS), len(FINDINGS_COLUMNS), 6}
    assert any(r"| \<script\>alert(1)\</script\>\|lora |" in line for line in table)
    assert r"\`x\`" in md  # the layer name's backticks, in the φ caption


def test_figure_files_have_fixed_names(hostile):
    _, page = hostile
    assert sorted(p.name for p in (page.parent / "figures").iterdir()) == sorted(f"{k}.png" for k in FIGURES)


# ---------------------------------------------------------------------------------------------- arguments
def test_layer_argument_picks_the_phi_layer(runs, tmp_path):
    text = report(runs, tmp_path / "fc2", layer="fc2").read_text(encoding="utf-8")
    assert "Layer fc2 at step 30 (as asked)" in text
    with pytest.raises(ValueError, match="'nope' is not a compared layer"):
        report(runs, tmp_path / "bad", layer="nope")


def test_default_phi_layer_is_the_worst_angle(runs, built):
    frame = compare(runs)
    last = frame[(frame["metric"] == "angle_left_max") & (frame["step"] == 30)]
    worst = last.loc[last["value"].idxmax(), "layer"]
    assert f"Layer {worst} at step 30 (the largest angle" in built.read_text(encoding="utf-8")


def test_rejects_no_runs_and_repeated_names(runs, tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        report([], tmp_path)
    with pytest.raises(ValueError, match="unique"):
        report([runs[0], runs[0]], tmp_path)


def test_missing_data_becomes_notes_and_stale_figures_go(tmp_path, built):
    lonely = train(RunConfig(task="digits", method="lora", out=tmp_path / "noshadow", steps=10, every=5,
                             shadow=False))
    out = tmp_path / "out"
    shutil.copytree(built.parent, out)  # an earlier report in the same folder, with every figure
    page = report([load_run(lonely)], out)
    text = page.read_text(encoding="utf-8")
    assert "no comparison with a reference run" in text and "no run recorded shadow_update_cosine" in text
    drawn = {p.stem for p in (out / "figures").iterdir()}
    assert drawn == {"loss", "intruders"}  # no shadow: no residuals, moments or shadow cosines either
    assert len(parse(page).images) == len(drawn)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"\(figures/(\w+)\.png\)", md)) == sorted(drawn)


@pytest.mark.parametrize("draw", [figures.loss_curves, figures.shadow_heatmaps, figures.moment_alignment,
                                  figures.projection_residuals, figures.intruder_bars])
def test_figures_say_what_is_missing(runs, draw):
    with pytest.raises(figures.MissingData, match="no "):
        draw(run_frame(runs).iloc[:0])


def test_comparison_figures_say_what_is_missing(runs):
    for frame in (None, compare(runs).iloc[:0]):
        with pytest.raises(figures.MissingData, match="no "):
            figures.angle_heatmaps(frame)
    with pytest.raises(figures.MissingData, match="no φ grid"):
        figures.phi_heatmaps(pd.DataFrame(columns=["run", "i", "j", "value"]), "fc1", 30)


# ---------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")  # module scope: set up before the module-scoped runs, so a skip trains none
def browser() -> str:
    """Debian's chromium (the browser tests ask for it first)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def chromium(browser: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def probed_copy(page: Path, dst: Path, *, keep_csp: bool) -> Path:
    text = page.read_text(encoding="utf-8")
    csp = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    assert csp in text
    if not keep_csp:
        text = text.replace(csp, "")  # the policy would (rightly) block the test's own probe
    dst.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    return dst


def test_browser_loads_every_image(browser, built, tmp_path):
    probed = probed_copy(built, tmp_path / "probed.html", keep_csp=False)
    dom = chromium(browser, "--dump-dom", probed.as_uri(), profile=tmp_path / "profile").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(FIGURES)}"' in body and 'data-loaded="true"' in body


def test_browser_policy_blocks_scripts(browser, built, tmp_path):
    probed = probed_copy(built, tmp_path / "probed.html", keep_csp=True)
    dom = chromium(browser, "--dump-dom", probed.as_uri(), profile=tmp_path / "profile").stdout
    assert "<body" in dom and "data-loaded" not in dom


def test_browser_screenshot(browser, hostile, tmp_path):
    _, page = hostile
    shot = tmp_path / "page.png"
    chromium(browser, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri(), profile=tmp_path / "profile")
    assert shot.read_bytes().startswith(PNG_MAGIC)
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 1000  # text alone gives a few hundred; the figures add thousands
