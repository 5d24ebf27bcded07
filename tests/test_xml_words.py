"""Words and glyphs written into ALTO and PAGE pages (write_page with `words`), their regions on the
page, and the written files checked against the official schemas (tests/schemas, offline)."""

import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from crnn.data.xml_pages import (
    GlyphBox,
    LineConfidence,
    WordBox,
    crop_lines,
    read_page,
    word_region,
    write_page,
)
from tests.helpers import REPO, schema_errors

ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
PAGE_NS = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
COPISTE_PAGES = REPO.parent / "shared" / "data" / "copiste-pages"

# valid ALTO 4.2: a line with a polygon and former words, one with only a box, one with a degenerate
# polygon, two more; the TextBlock's ID is the one a new word of l2 would take
ALTO = f"""<?xml version="1.0" encoding="UTF-8"?>
<alto xmlns="{ALTO_NS}" xmlns:xlink="http://www.w3.org/1999/xlink" SCHEMAVERSION="4.2">
<Description><MeasurementUnit>pixel</MeasurementUnit><sourceImageInformation><fileName>page.png</fileName>
</sourceImageInformation></Description><Tags><OtherTag ID="LT1" LABEL="default"/></Tags>
<Layout><Page ID="p1" PHYSICAL_IMG_NR="1" WIDTH="1000" HEIGHT="400"><PrintSpace>
<TextBlock ID="l2_w0" HPOS="0" VPOS="0" WIDTH="1000" HEIGHT="400">
<Shape><Polygon POINTS="0 0 1000 0 1000 400"/></Shape>
<TextLine ID="l1" TAGREFS="LT1" BASELINE="100 90 500 90" HPOS="100" VPOS="40" WIDTH="400" HEIGHT="60">
<Shape><Polygon POINTS="100 40 500 40 500 100 100 100"/></Shape><String ID="l1_w0" CONTENT="old"/><SP/>
<String ID="s2" CONTENT="words" WC="0.5"/><HYP CONTENT="-"/></TextLine>
<TextLine ID="l2" HPOS="100" VPOS="140" WIDTH="300" HEIGHT="50"><String CONTENT="boxed"/></TextLine>
<TextLine ID="l3" HPOS="100" VPOS="240"><Shape><Polygon POINTS="100 240 400 240 700 240"/></Shape>
<String CONTENT="flat"/></TextLine>
<TextLine ID="l4" HPOS="100" VPOS="300" WIDTH="300" HEIGHT="50"><String CONTENT="before"/></TextLine>
<TextLine ID="l5" HPOS="100" VPOS="350" WIDTH="300" HEIGHT="40"><String CONTENT="before"/></TextLine>
</TextBlock></PrintSpace></Page></Layout></alto>
"""

# valid PAGE 2019: a slanted line with a baseline, a former Word, its TextEquiv and a TextStyle after
PAGE = f"""<?xml version="1.0" encoding="UTF-8"?>
<PcGts xmlns="{PAGE_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<Metadata><Creator>test</Creator>
<Created>2024-01-01T00:00:00</Created><LastChange>2024-01-01T00:00:00</LastChange></Metadata>
<Page imageFilename="page.png" imageWidth="1000" imageHeight="400">
<ReadingOrder><OrderedGroup id="ro1"><RegionRefIndexed index="0" regionRef="r1"/></OrderedGroup>
</ReadingOrder>
<TextRegion id="r1" custom="structure {{type:paragraph;}}"><Coords points="0,0 1000,0 1000,400 0,400"/>
<TextLine id="t1" custom="readingOrder {{index:0;}}"><Coords points="100,40 500,50 500,110 100,100"/>
<Baseline points="100,90 500,95"/><Word id="t1_w0"><Coords points="100,40 200,40 200,100"/>
<TextEquiv><Unicode>old</Unicode></TextEquiv></Word><TextEquiv conf="0.5"><Unicode>old</Unicode></TextEquiv>
<TextStyle fontSize="12"/></TextLine>
<TextLine id="t2"><Coords points="100,200 400,200 400,250 100,250"/>
<TextEquiv><Unicode>kept</Unicode></TextEquiv>
</TextLine></TextRegion></Page></PcGts>
"""


def spelled(text, x0, x1, confidence=0.9):
    """A WordBox whose characters share x0..x1 evenly, each with its own confidence."""
    step = (x1 - x0) / len(text)
    glyphs = [GlyphBox(char, x0 + i * step, x0 + (i + 1) * step, 1.0 - i / 10) for i, char in enumerate(text)]
    return WordBox(text, x0, x1, confidence, glyphs)


def write(tmp_path, source, words, glyphs=True, texts=None, name="in.xml"):
    (tmp_path / name).write_text(source, encoding="utf-8")
    page = read_page(tmp_path / name)
    texts = texts or {line_id: " ".join(word.text for word in found) for line_id, found in words.items()}
    write_page(page, texts, tmp_path / "out.xml", {}, words, glyphs)
    return tmp_path / "out.xml"


def rest(path, line_ids):
    """The file's tree without what write_page replaces in lines `line_ids`, canonical."""
    root = ET.parse(path).getroot()
    for line in root.iter():
        if line.get("ID", line.get("id")) in line_ids and line.tag.endswith("TextLine"):
            replaced = ("String", "SP", "HYP", "Word", "TextEquiv")
            for child in [c for c in line if c.tag.split("}")[1] in replaced]:
                line.remove(child)
    return ET.canonicalize(ET.tostring(root), strip_text=True)


def children(path, line_id):
    line = next(e for e in ET.parse(path).getroot().iter() if e.get("ID", e.get("id")) == line_id)
    return [(child.tag.split("}")[1], child) for child in line]


def ring(points):
    """A polygon from its smallest point on, as the same polygon may start anywhere."""
    start = points.index(min(points))
    return points[start:] + points[:start]


def points(element):
    """A PAGE element's Coords points, as a set (where the polygon starts does not matter)."""
    return set(element.find("{*}Coords").get("points").split())


def test_a_word_region_is_the_line_polygon_between_its_cuts_and_never_fails():
    slanted = [(100.0, 40.0), (500.0, 50.0), (500.0, 110.0), (100.0, 100.0)]
    assert ring(word_region(slanted, 200, 300)) == [(200, 42.5), (300, 45), (300, 105), (200, 102.5)]
    assert word_region(slanted, 300, 200) == word_region(slanted, 200, 300)  # x0 > x1: swapped
    assert ring(word_region(slanted, 50, 900)) == slanted  # wider than its line: the line
    assert word_region(slanted, 600, 700) == [(600, 40.0), (700, 40.0), (700, 110.0), (600, 110.0)]  # outside
    flat = [(100.0, 240.0), (400.0, 240.0), (700.0, 240.0)]
    assert word_region(flat, 50, 150) == [(100.0, 240.0), (150, 240.0), (150, 240.0), (100.0, 240.0)]
    assert word_region([], 10, 20) == [(10, 0.0), (20, 0.0), (20, 0.0), (10, 0.0)]


def test_alto_gets_a_string_per_word_with_glyphs_that_validates_and_keeps_the_rest(tmp_path):
    (tmp_path / "in.xml").write_text(ALTO, encoding="utf-8")
    assert schema_errors(tmp_path / "in.xml") == []
    words = {"l1": [spelled("une", 110, 200), spelled("ville", 230, 600, 0.8)],
             "l2": [spelled("boxed", 90, 450)], "l3": [spelled("flat", 150, 250)], "l4": []}
    out = write(tmp_path, ALTO, words, texts={"l1": "une ville", "l2": "boxed", "l3": "flat", "l4": "tout",
                                              "l5": ""})
    assert schema_errors(out) == []
    lines = {"l1", "l2", "l3", "l4", "l5"}
    assert rest(out, lines) == rest(tmp_path / "in.xml", lines)
    assert ET.parse(out).getroot().get("SCHEMAVERSION") == "4.2" and "ns0:" not in out.read_text("utf-8")
    line = children(out, "l1")
    assert [name for name, _ in line] == ["Shape", "String", "SP", "String"]
    une, ville = line[1][1], line[3][1]
    assert {key: une.get(key) for key in une.attrib} == {
        "ID": "l1_w0", "CONTENT": "une", "HPOS": "110", "VPOS": "40", "WIDTH": "90", "HEIGHT": "60",
        "WC": "0.9000", "CC": "0 1 2"}
    assert (ville.get("HPOS"), ville.get("WIDTH"), ville.get("WC")) == ("230", "270", "0.8000")  # to x=500
    glyphs = [(g.get("ID"), g.get("CONTENT"), g.get("HPOS"), g.get("WIDTH"), g.get("GC")) for g in une]
    assert glyphs == [("l1_w0_g0", "u", "110", "30", "1.0000"), ("l1_w0_g1", "n", "140", "30", "0.9000"),
                      ("l1_w0_g2", "e", "170", "30", "0.8000")]
    boxed = children(out, "l2")[0][1]  # a box-only line; the TextBlock holds the ID "l2_w0"
    assert [boxed.get(key) for key in ("ID", "HPOS", "VPOS", "WIDTH", "HEIGHT")] == [
        "l2_w0_1", "100", "140", "300", "50"]
    flat = children(out, "l3")[1][1]  # a degenerate polygon: the strip's box over the line's extent
    assert [flat.get(key) for key in ("CONTENT", "HPOS", "WIDTH", "HEIGHT")] == ["flat", "150", "100", "0"]
    for line_id, text in (("l4", "tout"), ("l5", "")):  # no words: the line's text in one String, its box
        (name, string), = children(out, line_id)
        assert name == "String" and string.get("CONTENT") == text and string.get("HPOS") == "100"
    assert [line.text for line in read_page(out).lines] == ["une ville", "boxed", "flat", "tout", None]


def test_glyphs_only_on_request_and_only_where_alto_has_them(tmp_path):
    words = {"l1": [spelled("une", 110, 200)]}
    plain = write(tmp_path, ALTO, words, glyphs=False)
    assert schema_errors(plain) == [] and not list(ET.parse(plain).getroot().iter(f"{{{ALTO_NS}}}Glyph"))
    v3 = write(tmp_path, ALTO.replace("ns-v4#", "ns-v3#"), words)  # ALTO v3 has no Glyph
    (_, _), (_, string) = children(v3, "l1")
    assert string.get("CONTENT") == "une" and not len(string)


def test_page_words_and_glyphs_take_the_place_of_the_former_words_and_validate(tmp_path):
    (tmp_path / "in.xml").write_text(PAGE, encoding="utf-8")
    assert schema_errors(tmp_path / "in.xml") == []
    words = {"t1": [spelled("une", 110, 200), spelled("ville", 230, 600, 0.8)]}
    write_page(read_page(tmp_path / "in.xml"), {"t1": "une ville", "t2": "encore"}, tmp_path / "out.xml",
               {"t1": LineConfidence(0.75, []), "t2": LineConfidence(0.5, [])}, words, glyphs=True)
    out = tmp_path / "out.xml"
    assert schema_errors(out) == []
    assert rest(out, {"t1", "t2"}) == rest(tmp_path / "in.xml", {"t1", "t2"})
    line = children(out, "t1")
    assert [name for name, _ in line] == ["Coords", "Baseline", "Word", "Word", "TextEquiv", "TextStyle"]
    une = line[2][1]
    assert une.get("id") == "t1_w0" and points(une) == {"110,40", "200,42", "200,102", "110,100"}
    assert [child.tag.split("}")[1] for child in une] == ["Coords", "Glyph", "Glyph", "Glyph", "TextEquiv"]
    assert (une[-1].get("conf"), une[-1][0].text) == ("0.9000", "une")
    assert (une[1].get("id"), points(une[1]), une[1][1].get("conf"), une[1][1][0].text) == (
        "t1_w0_g0", {"110,40", "140,41", "140,101", "110,100"}, "1.0000", "u")
    assert points(line[3][1]) == {"230,43", "500,50", "500,110", "230,103"}  # wider than its line: clipped
    assert (line[4][1].get("conf"), line[4][1][0].text) == ("0.7500", "une ville")
    assert [name for name, _ in children(out, "t2")] == ["Coords", "TextEquiv"]  # no words: as before
    assert [line.text for line in read_page(out).lines] == ["une ville", "encore"]


def test_page_2010_words_get_their_coords_as_point_children_like_its_lines(tmp_path):
    corners = ((100, 200), (400, 200), (400, 250), (100, 250))
    points_2010 = "".join(f'<Point x="{x}" y="{y}"/>' for x, y in corners)
    source = PAGE.replace("2019-07-15", "2010-03-19").replace(
        '<Coords points="100,200 400,200 400,250 100,250"/>', f"<Coords>{points_2010}</Coords>")
    out = write(tmp_path, source, {"t2": [spelled("encore", 150, 250)]})
    coords = children(out, "t2")[1][1].find("{*}Coords")
    assert coords.get("points") is None
    written = {(point.get("x"), point.get("y")) for point in coords}
    assert written == {("150", "200"), ("250", "200"), ("250", "250"), ("150", "250")}


def test_without_words_the_output_validates_as_before(tmp_path):
    alto = (ALTO, {"l1": "un", "l2": "", "l3": "x"}, LineConfidence(1.2, [0.9, 0.2]))
    for source, texts, confidence in (alto, (PAGE, {"t1": "un", "t2": ""}, LineConfidence(0.5, []))):
        (tmp_path / "in.xml").write_text(source, encoding="utf-8")
        confidences = dict.fromkeys(texts, confidence)  # 1.2: clipped to 1, the most the schemas allow
        write_page(read_page(tmp_path / "in.xml"), texts, tmp_path / "out.xml", confidences)
        assert schema_errors(tmp_path / "out.xml") == []
        assert [line.text for line in read_page(tmp_path / "out.xml").lines][:2] == ["un", None]


def test_a_crop_pixel_maps_back_to_page_x_through_the_crop_and_the_image_scale(tmp_path):
    (tmp_path / "in.xml").write_text(ALTO, encoding="utf-8")
    page = read_page(tmp_path / "in.xml")  # the XML's page is 1000 x 400, its image twice as large
    crops = crop_lines(page, Image.new("L", (2000, 800), 255), (60, 20), need_text=False)
    assert crops.ids[:2] == ["l1", "l2"] and crops.x_maps[:2] == [(100.0, 0.5), (100.0, 0.5)]
    assert crops.page_x(0, 0) == 100.0 and crops.page_x(0, 800) == 500.0 and crops.page_x(1, 300) == 250.0


@pytest.mark.skipif(not COPISTE_PAGES.is_dir(), reason="the copiste-pages development data is absent")
def test_real_escriptorium_pages_with_words_and_glyphs_validate(tmp_path):
    source = COPISTE_PAGES / "wikitexte_0055.xml"
    page = read_page(source)
    words = {}
    for line in page.lines:  # each line's words spread evenly over its polygon's width
        xs, split = [x for x, _ in line.polygon], (line.text or "").split()
        step = (max(xs) - min(xs)) / max(1, len(split))
        words[line.id] = [spelled(word, min(xs) + i * step, min(xs) + (i + 1) * step)
                          for i, word in enumerate(split)]
    write_page(page, {line.id: line.text or "" for line in page.lines}, tmp_path / "out.xml", {}, words, True)
    assert schema_errors(tmp_path / "out.xml") == []
    ids = {line.id for line in page.lines}
    assert rest(tmp_path / "out.xml", ids) == rest(source, ids)
    assert [line.text for line in read_page(tmp_path / "out.xml").lines] == [line.text for line in page.lines]
