"""Text lines from page XML: ALTO (v2 to v4) and PAGE (2010 to 2019), for `data.source=xml`; how
pages, images, regions, left-out lines and the crop cache work: docs/data.md ("Pages from
transcription platforms"). `write_page` writes a page back with recognised text, and with words
and glyphs where they are given (predict --out).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import multiprocessing
import unicodedata
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crnn.data.images import IMAGE_SUFFIXES, decode_image
from crnn.data.records import LineRecords
from crnn.errors import DataError
from crnn.outputs import atomic_write, atomic_write_text, replace_folder
from crnn.runlog import progress

OUTSIDE_TOLERANCE = 2.0  # pixels a point may lie outside its page (rounding) before the line is refused
CROP_VERSION = 2  # part of the cache key: bump when the cropping changes
ALTO_BOX = ("HPOS", "VPOS", "WIDTH", "HEIGHT")

Point = tuple[float, float]


def _local(tag: str) -> str:
    """'{namespace}TextLine' -> 'TextLine' (paths match any namespace with '{*}TextLine')."""
    return tag.rsplit("}", 1)[-1]


def parse_points(text: str | None) -> list[Point] | None:
    """'x,y x,y ...' (PAGE, ALTO v2/v3) or 'x y x y ...' (ALTO v4) -> points; [] if not given,
    None if malformed (not numbers, an odd count, NaN or infinite)."""
    try:
        numbers = [float(value) for value in (text or "").replace(",", " ").split()]
    except ValueError:
        return None
    if len(numbers) % 2 or not all(math.isfinite(number) for number in numbers):
        return None
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


def _geometry_problem(given: list[tuple[str, str, object]]) -> str | None:
    """The XML's geometries in order of preference, as (what, raw text, parsed: None when malformed,
    falsy when absent): a malformed first choice is a problem, never a reason to fall back silently."""
    for what, raw, parsed in given:
        if parsed is None:
            return f"malformed {what} {raw if len(raw) <= 60 else raw[:60] + '...'!r}"
        if parsed:
            return None
    return None


@dataclass
class XmlLine:
    """One text line of a page, as the XML gives it (coordinates in the XML's page pixels)."""

    id: str
    text: str | None  # NFC, None without a transcription
    polygon: list[Point]  # its polygon, else its box (ALTO); [] when the XML gives neither
    baseline: list[Point]
    element: ET.Element = field(repr=False)
    geometry_problem: str | None = None  # the XML's region for this line is malformed (so none is used)


@dataclass
class XmlPage:
    path: Path
    kind: str  # "alto" or "page"
    image_name: str  # as the XML names it ("" if it does not)
    size: tuple[float, float] | None  # the page's width and height in the XML, if given
    lines: list[XmlLine]
    tree: ET.ElementTree = field(repr=False)
    image_root: Path | None = None  # the folder its image must lie in (None: the XML's own folder)


def _nfc(text: str) -> str | None:
    return unicodedata.normalize("NFC", text).strip() or None


def _alto_line(line: ET.Element, number: int) -> XmlLine:
    parts, spaced = [], line.find("{*}SP") is not None
    for child in line:
        name = _local(child.tag)
        if name == "SP" or (name == "String" and parts and not spaced):
            parts.append(" ")  # Strings without SP between them are words
        if name in ("String", "HYP"):
            parts.append(child.get("CONTENT", ""))
    points_text = next((shape.get("POINTS") for shape in line.iterfind("{*}Shape/{*}Polygon")), None)
    raw = [line.get(key) for key in ALTO_BOX]
    box_text, box = " ".join(f"{key}={value}" for key, value in zip(ALTO_BOX, raw, strict=True)), []
    if any(value is not None for value in raw):  # a box must be 4 finite numbers of non-negative size
        try:
            x, y, w, h = (float(value) for value in raw)
            valid = all(map(math.isfinite, (x, y, w, h))) and w >= 0 and h >= 0
            box = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)] if valid else None
        except (TypeError, ValueError):
            box = None
    polygon, baseline = parse_points(points_text), parse_points(line.get("BASELINE"))
    problem = _geometry_problem([("Shape/Polygon POINTS", points_text, polygon), ("box", box_text, box),
                                 ("BASELINE", line.get("BASELINE"), baseline)])
    return XmlLine(line.get("ID") or f"line {number}", _nfc("".join(parts)), polygon or box or [], baseline or [],
                   line, problem)


def _page_points(line: ET.Element, name: str) -> tuple[str, str, list[Point] | None]:
    """PAGE Coords or Baseline as `_geometry_problem` takes it: (name, the points as written, the
    points) from a `points` attribute (2013+) or Point children (2010, a missing x or y: malformed)."""
    element = line.find("{*}" + name)
    if element is None:
        return name, "", []
    points = element.get("points")
    if points is None:
        points = " ".join(f"{p.get('x')},{p.get('y')}" for p in element.iterfind("{*}Point"))
    return name, points, parse_points(points)


def _page_text(element: ET.Element) -> str | None:
    """The element's own TextEquiv (the lowest `index` first), None if it has none."""
    for equiv in sorted(element.iterfind("{*}TextEquiv"), key=lambda e: int(e.get("index", "0") or 0)):
        unicode = equiv.find("{*}Unicode")
        if unicode is not None and unicode.text is not None:
            return _nfc(unicode.text)
    return None


def _page_line(line: ET.Element, number: int) -> XmlLine:
    text = _page_text(line)
    if text is None:
        text = _nfc(" ".join(word for word in map(_page_text, line.iterfind("{*}Word")) if word))
    coords, baseline = _page_points(line, "Coords"), _page_points(line, "Baseline")
    return XmlLine(line.get("id") or f"line {number}", text, coords[2] or [], baseline[2] or [], line,
                   _geometry_problem([coords, baseline]))


def read_page(path: Path, image_root: Path | None = None) -> XmlPage:
    """Parse an ALTO or PAGE file; DataError if it does not parse or is neither. Its page image is
    looked for inside `image_root` (None: the XML's own folder, see `find_image`)."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    root = tree.getroot()
    if _local(root.tag) == "alto":
        unit = (root.findtext(".//{*}MeasurementUnit") or "pixel").strip()
        if unit != "pixel":
            raise DataError(f"{path}: ALTO MeasurementUnit '{unit}' is not supported; export in pixels")
        page = next(root.iterfind(".//{*}Page"), ET.Element(""))
        size = (page.get("WIDTH"), page.get("HEIGHT"))
        lines = [_alto_line(line, i + 1) for i, line in enumerate(root.iterfind(".//{*}TextLine"))]
        kind, image_name = "alto", (root.findtext(".//{*}fileName") or "").strip()
    elif _local(root.tag) == "PcGts":
        page = root.find(".//{*}Page")
        if page is None:
            raise DataError(f"{path}: PAGE XML without a <Page> element")
        size = (page.get("imageWidth"), page.get("imageHeight"))
        lines = [_page_line(line, i + 1) for i, line in enumerate(page.iterfind(".//{*}TextLine"))]
        kind, image_name = "page", page.get("imageFilename", "").strip()
    else:
        raise DataError(f"{path}: neither ALTO nor PAGE XML (root element <{_local(root.tag)}>)")
    try:
        size = (float(size[0]), float(size[1])) if all(size) else None
    except ValueError:
        raise DataError(f"{path}: the page's size {size} is not a pair of numbers") from None
    if size and not all(math.isfinite(side) and side > 0 for side in size):
        raise DataError(f"{path}: the page's size {size} is not a pair of positive numbers")
    return XmlPage(path, kind, image_name, size, lines, tree, image_root)


def find_image(page: XmlPage) -> Path:
    """The page image: as named (relative to the XML's folder, or its file name there), else the one
    beside the XML with its name; DataError (the XML's file and line) for a named path that leaves
    `page.image_root` (default: the XML's folder), or no image found."""
    folder = page.path.parent
    root = (page.image_root or folder).resolve()
    named = Path(page.image_name.replace("\\", "/"))
    tried = [folder / named, folder / named.name] if page.image_name else []  # folder / absolute = absolute
    for candidate in tried + [page.path.with_suffix(suffix) for suffix in IMAGE_SUFFIXES]:
        if candidate.is_file() and candidate.resolve().is_relative_to(root):
            return candidate
    if page.image_name and not (folder / named).resolve().is_relative_to(root):
        raise DataError(f"{page.path}{_xml_line_of(page.path, page.image_name)}: the page image path "
                        f"'{page.image_name}' leads outside {root}, refused; put the image beside the XML file "
                        f"or name the folder that holds it (data.xml.image_root, predict --image-root)")
    given = f" (the XML names '{page.image_name}')" if page.image_name else ""
    raise DataError(f"{page.path}: page image not found{given}; put it beside the XML file")


def _xml_line_of(path: Path, text: str) -> str:
    """' (line N)': where `text` first appears in the file, for messages ('' if not found)."""
    with contextlib.suppress(OSError):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return next((f" (line {number})" for number, line in enumerate(lines, start=1) if text in line), "")
    return ""


def line_region(line: XmlLine, band: tuple[float, float]) -> list[Point]:
    """The line's outline: its polygon (or box), else a band of `band` = (above, below) px around
    its baseline. [] when the XML gives none of them."""
    if line.polygon:
        return line.polygon
    if len(line.baseline) >= 2:
        above, below = band
        return [(x, y - above) for x, y in line.baseline] + [(x, y + below) for x, y in reversed(line.baseline)]
    return []


def region_problem(points: list[Point], page_size: tuple[int, int]) -> str | None:
    """Why this region cannot be cropped from a page of `page_size`, or None."""
    if not points:
        return "no polygon, box or baseline"
    if not all(math.isfinite(value) for point in points for value in point):
        return "coordinates that are not finite numbers"
    if len(set(points)) < 3 or _area(points) < 1.0:
        return f"degenerate polygon ({len(set(points))} distinct points, no area)"
    width, height = page_size
    xs, ys, tolerance = [x for x, _ in points], [y for _, y in points], OUTSIDE_TOLERANCE
    if min(xs) < -tolerance or min(ys) < -tolerance or max(xs) > width + tolerance or max(ys) > height + tolerance:
        return (f"coordinates outside the {width}x{height} page (x {min(xs):g}..{max(xs):g}, y "
                f"{min(ys):g}..{max(ys):g}); does the XML belong to this image?")
    return None


def _area(points: list[Point]) -> float:
    pairs = zip(points, points[1:] + points[:1], strict=True)
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairs)) / 2


def _clip_x(points: list[Point], edge: float, side: int) -> list[Point]:
    """Sutherland-Hodgman: the part of the polygon where side * (x - edge) >= 0."""
    kept = []
    for (px, py), (qx, qy) in zip(points, points[1:] + points[:1], strict=True):
        p_in, q_in = side * (px - edge) >= 0, side * (qx - edge) >= 0
        if p_in != q_in:
            kept.append((edge, py + (qy - py) * (edge - px) / (qx - px)))
        if q_in:
            kept.append((qx, qy))
    return kept


def word_region(polygon: list[Point], x0: float, x1: float) -> list[Point]:
    """The part of a line's `polygon` between the vertical cuts x0 and x1 (page coordinates). Where
    that has no area (a strip outside the line, a degenerate or no polygon): the box of the strip,
    narrowed to the line's x extent where they overlap, over the line's y extent."""
    x0, x1 = sorted((x0, x1))
    clipped = _clip_x(_clip_x(polygon, x0, 1), x1, -1)
    if len(clipped) >= 3 and _area(clipped) > 0:
        return clipped
    xs, ys = [x for x, _ in polygon] or [x0, x1], [y for _, y in polygon] or [0.0]
    left, right = max(x0, min(xs)), min(x1, max(xs))
    left, right = (left, right) if left <= right else (x0, x1)
    return [(left, min(ys)), (right, min(ys)), (right, max(ys)), (left, max(ys))]


def crop_region(image: Image.Image, points: list[Point]) -> Image.Image:
    """The region's bounding box of `image` (mode L), white outside the region."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    left, top = max(0, int(min(xs))), max(0, int(min(ys)))
    crop = image.crop((left, top, min(image.width, int(max(xs)) + 1), min(image.height, int(max(ys)) + 1)))
    mask = Image.new("L", crop.size, 0)
    ImageDraw.Draw(mask).polygon([(x - left, y - top) for x, y in points], fill=255)
    return Image.composite(crop, Image.new("L", crop.size, 255), mask)


@dataclass
class PageCrops:
    """What one page gives: per usable line its id, text, crop (an image, PNG bytes or a PNG file of
    the cache folder) and size; the problems; `read` is False when the file is no ALTO or PAGE;
    from `crop_lines`, per line how its crop's x maps onto the page (`page_x`)."""

    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    crops: list[Image.Image | bytes | Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    read: bool = True
    x_maps: list[tuple[float, float]] = field(default_factory=list)  # (offset, scale): crop_lines only

    def page_x(self, index: int, x: float) -> float:
        """Line `index`'s crop pixel x (before any resize) in the XML's page coordinates."""
        offset, scale = self.x_maps[index]
        return offset + scale * x


def page_image(page: XmlPage) -> Image.Image:
    """The page's image, grayscale; DataError if it cannot be found or read."""
    image_path = find_image(page)
    return decode_image(image_path, str(image_path))


def crop_lines(page: XmlPage, image: Image.Image, band: tuple[float, float], need_text: bool = True) -> PageCrops:
    """Crop every line of `page` from its `image`. With `need_text`, lines without a transcription
    are problems too (training, evaluation); without, they are cropped (prediction)."""
    result = PageCrops()
    scale_x, scale_y = (image.width / page.size[0], image.height / page.size[1]) if page.size else (1.0, 1.0)
    for line in page.lines:
        region = [(x * scale_x, y * scale_y) for x, y in line_region(line, band)]
        problem = ("no transcription" if need_text and line.text is None else line.geometry_problem
                   or region_problem(region, image.size))
        if problem:
            result.problems.append(f"{page.path} line {line.id}: {problem}, line left out")
            continue
        result.ids.append(line.id)
        result.texts.append(line.text)
        result.crops.append(crop_region(image, region))
        result.sizes.append(result.crops[-1].size)
        left = max(0, int(min(x for x, _ in region)))  # the crop's left edge, as crop_region cuts it
        result.x_maps.append((left / scale_x, 1 / scale_x))
    return result


def crop_page(page: XmlPage, band: tuple[float, float]) -> PageCrops:
    """`crop_lines` for training and evaluation; a page image that cannot be read is a problem."""
    try:
        image = page_image(page)
    except DataError as err:
        return PageCrops(problems=[f"{err} ({len(page.lines)} line(s) left out)"])
    return crop_lines(page, image, band)


def page_lines(path: Path, band: tuple[float, float], cache_dir: Path | None,
               image_root: Path | None) -> PageCrops:
    """Read one XML file and crop its lines, as PNG bytes; with `cache_dir`, as the files of the
    page's crops folder there, made once, and reused without parsing the XML while neither the XML
    nor its image changed (their size and modification time, remembered in `cache_dir`/pages)."""
    folder = _remembered_crops(path, cache_dir, band, image_root) if cache_dir is not None else None
    if folder is not None:
        return _cached_crops(folder)
    try:
        page = read_page(path, image_root)
    except DataError as err:
        return PageCrops(problems=[str(err)], read=False)
    if cache_dir is None:
        crops = crop_page(page, band)
        pngs = [io.BytesIO() for _ in crops.crops]
        for crop, png in zip(crops.crops, pngs, strict=True):
            crop.save(png, format="PNG", compress_level=1)
        crops.crops = [png.getvalue() for png in pngs]
        return crops
    try:
        image = find_image(page)
    except DataError as err:
        return PageCrops(problems=[f"{err} ({len(page.lines)} line(s) left out)"])
    digest = hashlib.sha256()
    for part in (path.read_bytes(), image.read_bytes(), json.dumps([band, CROP_VERSION]).encode()):
        digest.update(hashlib.sha256(part).digest())
    folder = cache_dir / digest.hexdigest()[:32]
    if not (folder / "lines.json").is_file():  # a folder in place is complete; of two, the first stays
        replace_folder(folder, functools.partial(_save_crops, crop_page(page, band)), keep_existing=True)
    memo = {**_memo(path, image, band, image_root), "folder": folder.name}
    with contextlib.suppress(OSError):  # only a shortcut: the next start reads the files again
        atomic_write_text(_memo_path(path, cache_dir), json.dumps(memo))
    return _cached_crops(folder)


def _save_crops(crops: PageCrops, folder: Path) -> None:
    for i, crop in enumerate(crops.crops):
        crop.save(folder / f"{i}.png", compress_level=1)
    manifest = {"ids": crops.ids, "texts": crops.texts, "problems": crops.problems, "sizes": crops.sizes}
    (folder / "lines.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")


def _cached_crops(folder: Path) -> PageCrops:
    manifest = json.loads((folder / "lines.json").read_text(encoding="utf-8"))
    return PageCrops(manifest["ids"], manifest["texts"], [folder / f"{i}.png" for i in range(len(manifest["ids"]))],
                     [tuple(size) for size in manifest["sizes"]], manifest["problems"])


def _memo_path(xml_path: Path, cache_dir: Path) -> Path:
    return cache_dir / "pages" / f"{hashlib.sha256(str(xml_path.resolve()).encode()).hexdigest()[:32]}.json"


def _memo(xml_path: Path, image: Path, band: tuple[float, float], image_root: Path | None) -> dict:
    """What identifies a page's crops without reading its files: their paths, sizes and times."""
    stamps = {name: [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
              for name, path in (("xml", xml_path), ("image", image))}
    return {"version": CROP_VERSION, "band": list(band), "image_root": str(image_root or ""), **stamps}


def _remembered_crops(xml_path: Path, cache_dir: Path, band: tuple[float, float],
                      image_root: Path | None) -> Path | None:
    """The crops folder of an unchanged page, or None (then the page is read as the first time)."""
    try:
        memo = json.loads(_memo_path(xml_path, cache_dir).read_text(encoding="utf-8"))
        folder = cache_dir / memo.pop("folder")
        unchanged = memo == _memo(xml_path, Path(memo["image"][0]), band, image_root)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return folder if unchanged and (folder / "lines.json").is_file() else None


def map_pages(job, paths: list[Path], workers: int):
    """`job` over `paths` in order, in `workers` forked processes when there are several pages
    (cropping is CPU-bound); in this process otherwise."""
    workers = min(workers, len(paths))
    if workers < 2:
        yield from map(job, paths)
        return
    # fork: the children need no imports; they only read files and run PIL, no torch or threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(job, paths, chunksize=max(1, len(paths) // (8 * workers)))


class XmlRecords(LineRecords):
    """The lines of the ALTO / PAGE files `paths` (docs/data.md), cropped in `workers` processes."""

    def __init__(self, paths: list[Path], name: str, key: str, band: tuple[float, float], cache_dir: str,
                 workers: int, image_root: str):
        self.name, self.problems, self.texts, self.ids, self.pages = name, [], [], [], 0
        self._crops: list[bytes | Path] = []
        self._sizes: list[tuple[int, int]] = []
        job = functools.partial(page_lines, band=band, cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
                                image_root=Path(image_root).expanduser() if image_root else None)
        pages = progress(map_pages(job, paths, workers), f"{key}: cropping lines", total=len(paths))
        for path, lines in zip(paths, pages, strict=True):
            self.pages += lines.read
            self.ids += [f"{path}:{i}" for i in lines.ids]
            self.texts += lines.texts
            self._crops += lines.crops
            self._sizes += lines.sizes
            self.problems += lines.problems
        if not self.texts:
            raise DataError(f"{key}: no usable text lines in {name} ({len(self.problems)} problem(s); first: "
                            f"{' | '.join(self.problems[:3]) or '-'})")

    def image(self, index: int) -> Image.Image:
        return decode_image(self._crops[index], self.ids[index])

    def size_array(self) -> np.ndarray:
        return np.asarray(self._sizes, dtype=np.int64).reshape(-1, 2)


@dataclass
class LineConfidence:
    """How sure a reading is, as the page formats carry it: the line's (0-1) and each character's."""

    line: float
    characters: list[float]


@dataclass
class GlyphBox:
    """One character of a word, its cuts x0..x1 in page coordinates, its confidence (0-1)."""

    char: str
    x0: float
    x1: float
    confidence: float | None = None


@dataclass
class WordBox:
    """One word of a line: its text, its cuts x0..x1 in page coordinates, confidence, characters."""

    text: str
    x0: float
    x1: float
    confidence: float | None = None
    glyphs: list[GlyphBox] = field(default_factory=list)


def write_page(page: XmlPage, texts: dict[str, str], out_path: Path, confidences: dict[str, LineConfidence],
               words: dict[str, list[WordBox]] | None = None, glyphs: bool = False,
               band: tuple[float, float] = (0.0, 0.0)) -> int:
    """Write `page` to `out_path` with `texts` (line id -> recognised text) replacing those lines'
    former words (docs/data.md; `confidences`: ALTO `WC` and `CC`, PAGE `conf`), the file's namespace
    prefixes kept, whole or not at all. `words` (line id -> its words; a line without any: as without
    `words`) become ALTO `String`s with `SP` between them or PAGE `Word`s, each on the part of the line's
    region (`line_region` with `band`, as cropped) between its cuts; `glyphs`: a `Glyph` per character
    too (ALTO: v4 only, v2 and v3 have none). Returns the lines written."""
    for prefix, uri in (node for _, node in ET.iterparse(page.path, events=("start-ns",))):
        ET.register_namespace(prefix, uri)
    alto = page.kind == "alto"
    changed = [line for line in page.lines if line.id in texts]
    for line in changed:
        replaced = ("String", "SP", "HYP") if alto else ("Word", "TextEquiv")
        for child in [c for c in line.element if _local(c.tag) in replaced]:
            line.element.remove(child)
    taken = {element.get(key) for element in page.tree.iter() for key in ("ID", "id")}  # after the removal
    setter, new_id = _set_alto_text if alto else _set_page_text, functools.partial(_new_id, taken)
    for line in changed:
        region = line_region(line, band)
        boxes = [(word, word_region(region, word.x0, word.x1),
                  [(glyph, word_region(region, glyph.x0, glyph.x1)) for glyph in word.glyphs if glyphs])
                 for word in (words or {}).get(line.id) or []]
        setter(line.element, texts[line.id], confidences.get(line.id), boxes, new_id)
    atomic_write(out_path, lambda stream: page.tree.write(stream, encoding="UTF-8", xml_declaration=True))
    return len(changed)


def _new_id(taken: set, wanted: str) -> str:
    """`wanted`, or `wanted`_N where that is taken: XML IDs are unique in the file."""
    candidate, number = wanted, 0
    while candidate in taken:
        number += 1
        candidate = f"{wanted}_{number}"
    taken.add(candidate)
    return candidate


def _confidence(value: float) -> str:
    return f"{min(1.0, max(0.0, value)):.4f}"


def _alto_box(points: list[Point]) -> dict[str, str]:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    left, top = math.floor(min(xs)), math.floor(min(ys))
    box = (left, top, math.ceil(max(xs)) - left, math.ceil(max(ys)) - top)
    return dict(zip(ALTO_BOX, map(str, box), strict=True))


def _alto_string(line: ET.Element, text: str, box: dict, confidence: float | None,
                 characters: list) -> ET.Element:
    """A String; `characters`' confidences as CC (0 sure .. 9 unsure) where there is one per character."""
    string = ET.SubElement(line, line.tag[: -len("TextLine")] + "String", box, CONTENT=text)
    if confidence is not None:
        string.set("WC", _confidence(confidence))
    if len(characters) == len(text) and text and None not in characters:
        string.set("CC", " ".join(str(min(9, max(0, round((1.0 - c) * 9)))) for c in characters))
    return string


def _set_alto_text(line: ET.Element, text: str, confidence: LineConfidence | None, words: list,
                   new_id) -> None:
    """`words`: (WordBox, its region, [(GlyphBox, its region)]) each; none: a String with the line's box."""
    if not words:
        box = {key: line.get(key) for key in ALTO_BOX if key in line.attrib}
        sure = (confidence.line, confidence.characters) if confidence else (None, [])
        _alto_string(line, text, box, *sure)
    namespace = line.tag[: -len("TextLine")]
    for number, (word, region, glyphs) in enumerate(words):
        if number:
            ET.SubElement(line, namespace + "SP")
        box = {"ID": new_id(f"{line.get('ID', 'line')}_w{number}"), **_alto_box(region)}
        string = _alto_string(line, word.text, box, word.confidence, [g.confidence for g in word.glyphs])
        for index, (glyph, glyph_region) in enumerate(glyphs if "ns-v4" in namespace else []):
            element = ET.SubElement(string, namespace + "Glyph", ID=new_id(f"{box['ID']}_g{index}"),
                                    CONTENT=glyph.char, **_alto_box(glyph_region))
            if glyph.confidence is not None:
                element.set("GC", _confidence(glyph.confidence))


def _page_part(namespace: str, name: str, identifier: str, region: list[Point], point_children: bool,
               text: str, confidence: float | None) -> ET.Element:
    """A PAGE Word or Glyph: Coords (`points`, or PAGE 2010's Point children), TextEquiv."""
    element = ET.Element(namespace + name, id=identifier)
    coords = ET.SubElement(element, namespace + "Coords")
    points = [(max(0, round(x)), max(0, round(y))) for x, y in region]  # the schema: non-negative integers
    for x, y in points if point_children else []:
        ET.SubElement(coords, namespace + "Point", x=str(x), y=str(y))
    if not point_children:
        coords.set("points", " ".join(f"{x},{y}" for x, y in points))
    element.append(_text_equiv(namespace, text, confidence))
    return element


def _text_equiv(namespace: str, text: str, confidence: float | None) -> ET.Element:
    conf = {} if confidence is None else {"conf": _confidence(confidence)}
    equiv = ET.Element(namespace + "TextEquiv", conf)
    ET.SubElement(equiv, namespace + "Unicode").text = text
    return equiv


def _set_page_text(line: ET.Element, text: str, confidence: LineConfidence | None, words: list,
                   new_id) -> None:
    """`words` as `_set_alto_text` takes them, put where the line's former Words were."""
    namespace, coords = line.tag[: -len("TextLine")], line.find("{*}Coords")
    point_children = coords is not None and coords.get("points") is None and bool(coords.findall("{*}Point"))
    new = []
    for number, (word, region, glyphs) in enumerate(words):
        new.append(_page_part(namespace, "Word", new_id(f"{line.get('id', 'line')}_w{number}"), region,
                              point_children, word.text, word.confidence))
        for index, (glyph, glyph_region) in enumerate(glyphs):  # between the Word's Coords and TextEquiv
            new[-1].insert(index + 1, _page_part(namespace, "Glyph", new_id(f"{new[-1].get('id')}_g{index}"),
                                                 glyph_region, point_children, glyph.char, glyph.confidence))
    new.append(_text_equiv(namespace, text, None if confidence is None else confidence.line))
    later = [i for i, c in enumerate(line) if _local(c.tag) in ("TextStyle", "UserDefined", "Labels")]
    for offset, element in enumerate(new):  # the schema's order: ..., Word*, TextEquiv, TextStyle, ...
        line.insert((later[0] if later else len(line)) + offset, element)
