"""ALTO and PAGE XML pages as a data source, and predict's XML output, on pages the tests make."""

import json
import random
import unicodedata
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from crnn.config import load_config
from crnn.data import load_records, synthetic, xml_pages
from crnn.data.xml_pages import read_page
from crnn.trainer import fit
from tests.helpers import REPO, TINY, read_metrics, run_tool, schema_errors

COPISTE_PAGES = REPO.parent / "shared" / "data" / "copiste-pages"
ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
PAGE_NS = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"


def place_lines(texts, seed=0):
    """A 1400 x 120*N white page with the lines rendered at x=40, y=40+120*i; their boxes."""
    page = Image.new("L", (1400, 120 * len(texts) + 80), 255)
    boxes = []
    for i, text in enumerate(texts):
        drawable = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()  # ASCII fonts
        line = synthetic.render_line(drawable, random.Random(f"{seed}:{i}"), 64)
        x, y = 40, 40 + 120 * i
        page.paste(line, (x, y))
        boxes.append((x, y, x + line.width, y + line.height))
    return page, boxes


def polygon(box, inset=0):
    x0, y0, x1, y1 = box
    return [(x0 + inset, y0), (x1, y0 + inset), (x1 - inset, y1), (x0, y1 - inset)]


def alto(lines, image_name, size):
    """lines: (id, text or None, {"polygon": [...], "box": (...), "baseline": [...]})."""
    body = []
    for line_id, text, geometry in lines:
        attributes = f'ID="{line_id}"'
        if "box" in geometry:
            x0, y0, x1, y1 = geometry["box"]
            attributes += f' HPOS="{x0}" VPOS="{y0}" WIDTH="{x1 - x0}" HEIGHT="{y1 - y0}"'
        if "baseline" in geometry:
            attributes += ' BASELINE="' + " ".join(f"{x} {y}" for x, y in geometry["baseline"]) + '"'
        shape = ""
        if "polygon" in geometry:
            points = " ".join(f"{x} {y}" for x, y in geometry["polygon"])
            shape = f'<Shape><Polygon POINTS="{points}"/></Shape>'
        words = "" if text is None else "<SP/>".join(f'<String CONTENT="{word}"/>' for word in text.split(" "))
        body.append(f"<TextLine {attributes}>{shape}{words}</TextLine>")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<alto xmlns="{ALTO_NS}" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><Description>'
            f"<MeasurementUnit>pixel</MeasurementUnit><sourceImageInformation><fileName>{image_name}</fileName>"
            f'</sourceImageInformation></Description><Layout><Page WIDTH="{size[0]}" HEIGHT="{size[1]}">'
            f'<PrintSpace><TextBlock ID="b1">{"".join(body)}</TextBlock></PrintSpace></Page></Layout></alto>\n')


def page_xml(lines, image_name, size):
    """lines: (id, text or None, words or None, {"polygon": [...], "baseline": [...]})."""
    body = []
    for line_id, text, words, geometry in lines:
        parts = []
        if "polygon" in geometry:
            parts.append('<Coords points="' + " ".join(f"{x},{y}" for x, y in geometry["polygon"]) + '"/>')
        if "baseline" in geometry:
            parts.append('<Baseline points="' + " ".join(f"{x},{y}" for x, y in geometry["baseline"]) + '"/>')
        for i, word in enumerate(words or []):
            parts.append(f'<Word id="{line_id}_w{i}"><Coords points="0,0 1,0 1,1"/><TextEquiv><Unicode>{word}'
                         f"</Unicode></TextEquiv></Word>")
        if text is not None:
            parts.append(f"<TextEquiv><Unicode>{text}</Unicode></TextEquiv>")
        body.append(f'<TextLine id="{line_id}">{"".join(parts)}</TextLine>')
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<PcGts xmlns="{PAGE_NS}"><Metadata><Creator>test'
            f'</Creator></Metadata><Page imageFilename="{image_name}" imageWidth="{size[0]}" '
            f'imageHeight="{size[1]}"><TextRegion id="r1"><Coords points="0,0 10,0 10,10"/>{"".join(body)}'
            f"</TextRegion></Page></PcGts>\n")


# a decomposed é (e + U+0301): the transcription must come out in NFC
TEXTS = ["le chat noir", "une ville", "de\u0301ja vu"]


@pytest.fixture
def pages(tmp_path):
    """A split with one ALTO page and one PAGE page (three good lines each, plus bad ones), a
    malformed file and a page whose image is missing; returns the folder and the good texts."""
    folder = tmp_path / "pages"
    folder.mkdir()
    image, boxes = place_lines(TEXTS)
    image.convert("RGB").save(folder / "scan_a.jpg", quality=95)
    size = image.size
    baseline = [(boxes[2][0], boxes[2][3] - 14), (boxes[2][2], boxes[2][3] - 14)]
    (folder / "a.xml").write_text(alto([
        ("l1", TEXTS[0], {"polygon": polygon(boxes[0], 4), "box": boxes[0]}),
        ("l2", TEXTS[1], {"box": boxes[1]}),
        ("l3", TEXTS[2], {"baseline": baseline}),
        ("empty", None, {"box": boxes[0]}),
        ("flat", "xx", {"polygon": [(10, 10), (200, 10), (400, 10)]}),
        ("outside", "yy", {"box": (1300, 10, 1500, 60)}),
    ], "scan_a.jpg", size), encoding="utf-8")
    image.save(folder / "b.png")
    (folder / "b.xml").write_text(page_xml([
        ("p1", TEXTS[0], None, {"polygon": polygon(boxes[0])}),
        ("p2", None, TEXTS[1].split(" "), {"polygon": polygon(boxes[1])}),
        ("p3", TEXTS[2], None, {"baseline": baseline}),
        ("nothing", "zz", None, {}),
    ], "b.png", size), encoding="utf-8")
    (folder / "broken.xml").write_text("<alto><Layout>", encoding="utf-8")
    (folder / "lost.xml").write_text(alto([("x1", "lost", {"box": boxes[0]})], "lost.jpg", size), encoding="utf-8")
    return folder


def xml_config(*overrides):
    return load_config(TINY, ["data.source=xml", *overrides])


def test_lines_texts_and_crops_from_alto_and_page(pages):
    records = load_records(xml_config(f"data.train={pages}").data, "train")
    nfc = [unicodedata.normalize("NFC", text) for text in TEXTS]
    assert records.texts == nfc + nfc  # a.xml, then b.xml (p2's text from its words)
    assert records.ids[0] == f"{pages / 'a.xml'}:l1" and records.ids[3] == f"{pages / 'b.xml'}:p1"
    image, boxes = place_lines(TEXTS)
    for index, box in zip(range(3), boxes, strict=True):
        crop = records.image(index)
        assert crop.mode == "L" and abs(crop.width - (box[2] - box[0])) <= 1
        assert crop.getextrema()[0] < 100  # the ink is there
    polygon_crop = records.image(0)
    assert polygon_crop.getpixel((0, 0)) == 255  # outside the (inset) polygon: white
    band = records.image(2)  # from the baseline: 60 px above, 20 below by default
    assert band.height == 81


def test_every_bad_input_is_reported_with_file_and_line_and_the_rest_loads(pages):
    records = load_records(xml_config(f"data.train={pages}").data, "train")
    problems = " | ".join(records.problems)
    for expected in (f"{pages / 'a.xml'} line empty: no transcription",
                     f"{pages / 'a.xml'} line flat: degenerate polygon",
                     f"{pages / 'a.xml'} line outside: coordinates outside the 1400x440 page",
                     f"{pages / 'b.xml'} line nothing: no polygon, box or baseline",
                     f"{pages / 'broken.xml'}: malformed XML",
                     f"{pages / 'lost.xml'}: page image not found (the XML names 'lost.jpg')"):
        assert expected in problems, (expected, problems)
    assert len(records.problems) == 6 and len(records) == 6


def test_crops_are_made_once_and_reused_from_the_cache_folder(pages, tmp_path, monkeypatch):
    cfg = xml_config(f"data.train={pages}", f"data.xml.cache_dir={tmp_path / 'cache'}")
    first = load_records(cfg.data, "train")

    def crop_folders():
        return [path for path in (tmp_path / "cache").iterdir() if path.name != "pages"]

    assert len(crop_folders()) == 2  # one folder per page that has an image
    decoded, parsed = [], []
    monkeypatch.setattr("crnn.data.xml_pages.page_image", lambda page: decoded.append(page) or None)
    real_read_page = xml_pages.read_page
    monkeypatch.setattr("crnn.data.xml_pages.read_page", lambda *args: parsed.append(args[0]) or real_read_page(*args))
    again = load_records(cfg.data, "train")
    assert decoded == []  # no page image decoded: every crop came from the cache
    # the pages whose crops are cached are not even parsed again (broken.xml, lost.xml have none)
    assert sorted(path.name for path in parsed) == ["broken.xml", "lost.xml"]
    assert again.texts == first.texts and again.sizes() == first.sizes() and again.problems == first.problems
    assert again.image(1).tobytes() == first.image(1).tobytes()
    monkeypatch.undo()
    (pages / "a.xml").write_text((pages / "a.xml").read_text().replace('"ville"', '"village"'))
    changed = load_records(cfg.data, "train")  # a changed file is a new key: cropped again
    assert "une village" in changed.texts and len(crop_folders()) == 3


def test_pages_cropped_in_worker_processes_give_the_same_records(pages, tmp_path):
    for extra in ([], [f"data.xml.cache_dir={tmp_path / 'cache'}"]):
        one = load_records(xml_config(f"data.train={pages}", "data.num_workers=0", *extra).data, "train")
        two = load_records(xml_config(f"data.train={pages}", "data.num_workers=2", *extra).data, "train")
        assert (two.ids, two.texts, two.sizes(), two.problems) == (one.ids, one.texts, one.sizes(), one.problems)
        assert [two.image(i).tobytes() for i in range(len(two))] == [one.image(i).tobytes() for i in range(len(one))]
        assert two.pages == one.pages == 3  # broken.xml is no page; lost.xml is one, without its image


@pytest.fixture
def xml_run(pages, tmp_path):
    """A tiny model trained on the XML pages (train = validation), as tools/train.py would."""
    run_dir = tmp_path / "run"
    fit(xml_config(f"data.train={pages}", f"data.validation={pages}", "train.epochs=2", "data.batch_size=3",
                   f"train.output_dir={run_dir}"))
    return run_dir


@pytest.mark.slow
def test_train_evaluate_and_check_data_on_xml(pages, xml_run, tmp_path):
    assert [m["epoch"] for m in read_metrics(xml_run)] == [1, 2]
    result = run_tool("tools/evaluate.py", "--ckpt", xml_run / "checkpoints" / "best.pt", "--split", "validation",
                      "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["greedy"]["lines"] == 6
    assert "6 line(s)" in result.stderr and "left out" in result.stderr
    check = run_tool("tools/check_data.py", "--cfg", TINY, "--splits", "train", "data.source=xml",
                     f"data.train={pages}")
    assert check.returncode == 1 and "train: 6 usable lines, 6 problem(s)" in check.stderr
    assert f"{pages / 'a.xml'} line flat: degenerate polygon" in check.stdout


@pytest.mark.slow
def test_predict_fills_the_xml_and_the_pages_read_back(pages, xml_run, tmp_path):
    out = tmp_path / "out"
    result = run_tool("tools/predict.py", "--ckpt", xml_run / "checkpoints" / "best.pt", pages / "a.xml",
                      pages / "b.xml", "--out", out, "--glyphs")
    assert result.returncode == 0, result.stderr
    printed = dict(line.split("\t", 1) for line in result.stdout.strip().splitlines())
    assert len(printed) == 4 + 3  # every line with a region, "empty" included; not flat/outside/nothing
    for name in ("a.xml", "b.xml"):  # a word element per word read, and no schema error the input lacks
        assert set(schema_errors(out / name)) <= set(schema_errors(pages / name))
        root = ET.parse(out / name).getroot()
        for element in root.iter():
            key = f"{pages / name}:{element.get('ID') or element.get('id')}"
            if element.tag.endswith("TextLine") and key in printed:
                words = [child for child in element if child.tag.rsplit("}", 1)[-1] in ("String", "Word")]
                assert len(words) == len(printed[key].split()), key
    for name in ("a.xml", "b.xml"):
        written = read_page(out / name)
        assert written.kind == read_page(pages / name).kind
        for line in written.lines:
            key = f"{pages / name}:{line.id}"
            if key in printed:
                assert line.text == (unicodedata.normalize("NFC", printed[key]).strip() or None), key
        assert "ns0:" not in (out / name).read_text(encoding="utf-8")  # the namespaces are kept
    as_json = run_tool("tools/predict.py", "--ckpt", xml_run / "checkpoints" / "best.pt", pages / "a.xml",
                       "--out", tmp_path / "json", "--json")
    rows = [json.loads(line) for line in as_json.stdout.strip().splitlines()]
    width = read_page(pages / "a.xml").size[0]  # words and characters in the page's coordinates
    assert all(0 <= w["x0"] <= w["x1"] <= width and len(w["polygon"]) >= 3 for row in rows for w in row["words"])
    assert any(row["words"] for row in rows) and all(c["x1"] <= width for row in rows for c in row["characters"])
    unchanged = {line.id: line.text for line in read_page(out / "a.xml").lines}
    assert unchanged["flat"] == "xx" and unchanged["outside"] == "yy"  # not croppable: left as they were
    assert "line flat: degenerate polygon" in result.stderr
    assert "a.xml: 4 of 6 line(s) transcribed" in result.stderr and "b.xml: 3 of 4 line(s)" in result.stderr
    missing = run_tool("tools/predict.py", "--ckpt", xml_run / "checkpoints" / "best.pt", pages)
    assert missing.returncode == 2 and "XML pages need --out DIR" in missing.stderr  # a folder of pages too
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder is needed", encoding="utf-8")
    unwritable = run_tool("tools/predict.py", "--ckpt", xml_run / "checkpoints" / "best.pt", pages / "b.xml",
                          "--out", blocker / "sub")
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
    last = unwritable.stderr.strip().splitlines()[-1]
    assert last == f"error: --out: {blocker / 'sub'}: {blocker} is a file, not a folder; give a folder"


def test_predict_never_overwrites_its_input_pages_unless_asked(pages, checkpoint, tmp_path):
    before = {name: (pages / name).read_bytes() for name in ("a.xml", "b.xml")}
    same = run_tool("tools/predict.py", "--ckpt", checkpoint, pages / "a.xml", pages / "b.xml", "--out", pages)
    assert same.returncode == 2 and "Traceback" not in same.stderr
    assert same.stderr.strip().splitlines()[-1] == (
        f"error: --out {pages}: the transcribed page would overwrite its input {pages / 'a.xml'}; give another "
        f"--out, or --in-place to write into the input pages (each backed up as a.xml.bak)")
    twice = run_tool("tools/predict.py", "--ckpt", checkpoint, pages / "a.xml", tmp_path / "x" / ".." / "pages" / "a.xml",
                     "--out", tmp_path / "out")
    assert twice.returncode == 2 and "two input pages are named a.xml" in twice.stderr
    assert {name: (pages / name).read_bytes() for name in before} == before
    in_place = run_tool("tools/predict.py", "--ckpt", checkpoint, pages / "a.xml", pages / "b.xml", "--in-place")
    assert in_place.returncode == 0, in_place.stderr
    assert f"the original kept as {pages / 'a.xml.bak'}" in in_place.stderr
    for name, original in before.items():
        assert (pages / f"{name}.bak").read_bytes() == original
        assert (pages / name).read_bytes() != original and read_page(pages / name).kind == read_page(
            pages / f"{name}.bak").kind
    transcribed = (pages / "a.xml").read_bytes()
    assert run_tool("tools/predict.py", "--ckpt", checkpoint, pages / "a.xml", "--in-place").returncode == 0
    assert (pages / "a.xml.bak").read_bytes() == before["a.xml"]  # a backup is never replaced
    assert (pages / "a.xml.bak.1").read_bytes() == transcribed


def test_a_line_with_garbage_geometry_keeps_its_text_and_is_reported(pages, checkpoint, tmp_path):
    source = (pages / "a.xml").read_text(encoding="utf-8")
    source = source.replace('<TextLine ID="l2"', '<TextLine ID="l2"><Shape><Polygon POINTS="nan nan 1e309 5 abc 7"/>'
                            '</Shape></TextLine><TextLine ID="l2b"', 1)
    source = source.replace('<TextLine ID="l3"', '<TextLine ID="l0" HPOS="40" VPOS="nan" WIDTH="5" HEIGHT="5">'
                            '<String CONTENT="kept"/></TextLine><TextLine ID="l3"', 1)
    (pages / "a.xml").write_text(source, encoding="utf-8")
    page = read_page(pages / "a.xml")
    problems = {line.id: line.geometry_problem for line in page.lines if line.geometry_problem}
    assert problems == {"l2": "malformed Shape/Polygon POINTS 'nan nan 1e309 5 abc 7'",
                        "l0": "malformed box 'HPOS=40 VPOS=nan WIDTH=5 HEIGHT=5'"}
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, pages / "a.xml", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert f"{pages / 'a.xml'} line l2: malformed Shape/Polygon POINTS 'nan nan 1e309 5 abc 7', line left out" \
        in result.stderr
    assert f"{pages / 'a.xml'} line l0: malformed box" in result.stderr
    written = {line.id: line.text for line in read_page(tmp_path / "out" / "a.xml").lines}
    assert written["l0"] == "kept" and written["l2"] is None  # as they were (l2 had no text)
    printed = [line.split("\t")[0].rsplit(":", 1)[1] for line in result.stdout.strip().splitlines()]
    assert "l2" not in printed and "l0" not in printed and "l2b" in printed


def test_a_page_image_path_that_leaves_the_folder_is_refused(pages, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (pages / "scan_a.jpg").rename(outside / "scan_a.jpg")
    (pages / "a.xml").write_text((pages / "a.xml").read_text(encoding="utf-8").replace(
        "<fileName>scan_a.jpg</fileName>", "<fileName>../elsewhere/scan_a.jpg</fileName>"), encoding="utf-8")
    records = load_records(xml_config(f"data.train={pages}").data, "train")
    refused = [problem for problem in records.problems if "a.xml" in problem]
    assert refused == [f"{pages / 'a.xml'} (line 2): the page image path '../elsewhere/scan_a.jpg' leads outside "
                       f"{pages.resolve()}, refused; put the image beside the XML file or name the folder that holds "
                       f"it (data.xml.image_root, predict --image-root) (6 line(s) left out)"]
    allowed = load_records(xml_config(f"data.train={pages}", f"data.xml.image_root={tmp_path}").data, "train")
    assert len(allowed) == len(records) + 3 and not [p for p in allowed.problems if "leads outside" in p]


@pytest.mark.skipif(not COPISTE_PAGES.is_dir(), reason="the copiste-pages development data is absent")
def test_real_escriptorium_pages():
    records = load_records(xml_config(f"data.train={COPISTE_PAGES}").data, "train")
    assert records.pages == 6 and len(records) == 138 and records.problems == []
    assert records.texts[0] == "Philippe de Croy, 3e duc d'Aerschot, né le"


def test_predict_writes_confidences_where_alto_and_page_keep_them(pages, calibrated_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, pages / "a.xml", pages / "b.xml",
                      "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    readings = {row["path"].rsplit(":", 1)[1]: row for row in map(json.loads, result.stdout.strip().splitlines())}
    alto_strings = {line.id: next(child for child in line.element if child.tag.endswith("String"))
                    for line in read_page(out / "a.xml").lines if line.id in readings}
    def line_confidence(row):  # one minus the expected CER, within [0, 1] as ALTO and PAGE require
        return min(max(1 - row["expected_cer"], 0.0), 1.0)

    for line_id, string in alto_strings.items():
        row = readings[line_id]
        assert float(string.get("WC")) == pytest.approx(line_confidence(row), abs=1e-4)
        if row["text"]:
            digits = [int(d) for d in string.get("CC").split()]
            assert digits == [min(9, max(0, round((1 - c["confidence"]) * 9))) for c in row["characters"]]
    page_lines = [line for line in read_page(out / "b.xml").lines if line.id in readings]
    for line in page_lines:
        equiv = next(child for child in line.element if child.tag.endswith("TextEquiv"))
        assert float(equiv.get("conf")) == pytest.approx(line_confidence(readings[line.id]), abs=1e-4)
    assert alto_strings and page_lines
