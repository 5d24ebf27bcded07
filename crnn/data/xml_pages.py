"""Text lines from transcription platforms' page XML: ALTO (v2 to v4) and PAGE (2010 to 2019).

`data.source=xml`: a split is a folder (or a glob) of XML files, each detected as ALTO or PAGE by
its root element, whose page image sits beside it or is named in it (ALTO
`sourceImageInformation/fileName`, PAGE `Page@imageFilename`). Every text line becomes a sample:

- its region is the line's polygon (ALTO `Shape/Polygon`, PAGE `Coords`), else its box (ALTO
  `HPOS/VPOS/WIDTH/HEIGHT`), else a band around its baseline, `data.xml.baseline_above` pixels
  above and `data.xml.baseline_below` below it; the crop is the region's bounding box with
  everything outside the region painted white;
- its transcription is ALTO's `String CONTENT`s (joined by `SP`, or by spaces), PAGE's line
  `TextEquiv/Unicode` (else its words' joined by spaces), in Unicode NFC.

What cannot be used is left out, counted and reported with its file and line id: XML that does not
parse or is neither ALTO nor PAGE, a page image that cannot be found or read, a line without
text (for training), a line without a region, with a malformed one (its first choice of polygon,
box, baseline not numbers or not finite: never replaced by the next choice) or a degenerate one
(fewer than 3 distinct points, no area), a line reaching more than 2 px outside its page (the XML
may not belong to that image). Page coordinates are scaled when the XML's page size differs from
the image's. A page image must lie in the XML's folder (or `data.xml.image_root`): a path in the
XML that leads elsewhere is refused.

Crops are made once, when the split is loaded (in `data.num_workers` processes): kept in memory as
PNG, or with `data.xml.cache_dir` in a folder keyed by the XML's and the image's content (and the
crop settings), so later runs, evaluate and predict reuse them without opening the page images.

`write_page` writes a page back with recognised text in every line (tools/predict.py --out).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import unicodedata
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from crnn.data.images import IMAGE_SUFFIXES, decode_image
from crnn.data.records import LineRecords
from crnn.errors import DataError
from crnn.outputs import atomic_write
from crnn.runlog import progress

OUTSIDE_TOLERANCE = 2.0  # pixels a point may lie outside its page (rounding) before the line is refused
CROP_VERSION = 2  # part of the cache key: bump when the cropping changes


def _local(tag: str) -> str:
    """'{namespace}TextLine' -> 'TextLine'."""
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    found = _children(element, name)
    return found[0] if found else None


def _descendants(element: ET.Element, name: str) -> list[ET.Element]:
    return [node for node in element.iter() if _local(node.tag) == name]


Point = tuple[float, float]


def parse_points(text: str | None) -> list[Point] | None:
    """'x,y x,y ...' (PAGE, ALTO v2/v3) or 'x y x y ...' (ALTO v4) -> points; [] if not given,
    None if malformed (not numbers, an odd count, NaN or infinite)."""
    if text is None or not text.strip():
        return []
    try:
        numbers = [float(value) for value in text.replace(",", " ").split()]
    except ValueError:
        return None
    if len(numbers) % 2 or not all(math.isfinite(number) for number in numbers):
        return None
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _geometry(given: list[tuple[str, str | None, object]]) -> tuple[object, str | None]:
    """The first geometry the XML gives, in order of preference: `given` holds (what, raw text,
    parsed) with parsed None when malformed and falsy when absent. Returns (parsed, problem): a
    malformed first choice is a problem, never a reason to fall back to the next one silently."""
    for what, raw, parsed in given:
        if parsed is None:
            return None, f"malformed {what} {_shown(raw or '')}"
        if parsed:
            return parsed, None
    return None, None


@dataclass
class XmlLine:
    """One text line of a page, as the XML gives it (coordinates in the XML's page pixels)."""

    id: str
    text: str | None  # NFC, None without a transcription
    polygon: list[Point]  # [] when the XML gives none
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1
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
    text = unicodedata.normalize("NFC", text).strip()
    return text or None


def _alto_text(line: ET.Element) -> str | None:
    parts, spaced = [], bool(_children(line, "SP"))
    for child in line:
        name = _local(child.tag)
        if name in ("String", "HYP"):
            if parts and not spaced and name == "String":
                parts.append(" ")  # Strings without SP between them are words
            parts.append(child.get("CONTENT", ""))
        elif name == "SP":
            parts.append(" ")
    return _nfc("".join(parts))


def _alto_box(line: ET.Element) -> tuple[str, tuple[float, float, float, float] | None | bool]:
    """(the attributes as written, the box x0, y0, x1, y1): False if the line has no box
    attributes, None if they are incomplete, not numbers, not finite or of negative size."""
    raw = [line.get(key) for key in ("HPOS", "VPOS", "WIDTH", "HEIGHT")]
    text = " ".join(f"{key}={value}" for key, value in zip(("HPOS", "VPOS", "WIDTH", "HEIGHT"), raw, strict=True))
    if all(value is None for value in raw):
        return text, False
    try:
        x, y, w, h = (float(value) for value in raw)
    except (TypeError, ValueError):
        return text, None
    if not all(math.isfinite(value) for value in (x, y, w, h)) or w < 0 or h < 0:
        return text, None
    return text, (x, y, x + w, y + h)


def _alto_line(line: ET.Element, number: int) -> XmlLine:
    shape = _child(line, "Shape")
    polygon = _child(shape, "Polygon") if shape is not None else None
    points_text = polygon.get("POINTS") if polygon is not None else None
    box_text, box = _alto_box(line)
    polygon_points, baseline = parse_points(points_text), parse_points(line.get("BASELINE"))
    region, problem = _geometry([("Shape/Polygon POINTS", points_text, polygon_points), ("box", box_text, box),
                                 ("BASELINE", line.get("BASELINE"), baseline)])
    return XmlLine(line.get("ID") or f"line {number}", _alto_text(line), polygon_points or [],
                   box or None, baseline or [], line, problem)


def _page_points(element: ET.Element | None) -> tuple[str, list[Point] | None]:
    """PAGE Coords/Baseline: (the points as written, the points) from a `points` attribute (2013+)
    or Point children (2010); the points are None if malformed, [] if not given."""
    if element is None:
        return "", []
    if element.get("points") is not None:
        return element.get("points"), parse_points(element.get("points"))
    children = _children(element, "Point")
    text = " ".join(f"{p.get('x')},{p.get('y')}" for p in children)
    return text, parse_points(text.replace("None", "?"))


def _page_text(element: ET.Element) -> str | None:
    """The element's own TextEquiv (the lowest `index` first), None if it has none."""
    equivs = sorted(_children(element, "TextEquiv"), key=lambda e: int(e.get("index", "0") or 0))
    for equiv in equivs:
        unicode = _child(equiv, "Unicode")
        if unicode is not None and unicode.text is not None:
            return _nfc(unicode.text)
    return None


def _page_line(line: ET.Element, number: int) -> XmlLine:
    text = _page_text(line)
    if text is None:
        words = [_page_text(word) for word in _children(line, "Word")]
        text = _nfc(" ".join(word for word in words if word))
    (coords_text, coords), (baseline_text, baseline) = _page_points(_child(line, "Coords")), _page_points(
        _child(line, "Baseline"))
    _, problem = _geometry([("Coords", coords_text, coords), ("Baseline", baseline_text, baseline)])
    return XmlLine(line.get("id") or f"line {number}", text, coords or [], None, baseline or [], line, problem)


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
    kind = {"alto": "alto", "PcGts": "page"}.get(_local(root.tag))
    if kind is None:
        raise DataError(f"{path}: neither ALTO nor PAGE XML (root element <{_local(root.tag)}>)")
    page = _read_alto(path, tree) if kind == "alto" else _read_page_xml(path, tree)
    page.image_root = image_root
    return page


def _read_alto(path: Path, tree: ET.ElementTree) -> XmlPage:
    root = tree.getroot()
    unit = next((node.text for node in _descendants(root, "MeasurementUnit")), "pixel") or "pixel"
    if unit.strip() != "pixel":
        raise DataError(f"{path}: ALTO MeasurementUnit '{unit.strip()}' is not supported; export in pixels")
    names = [node.text or "" for node in _descendants(root, "fileName")]
    pages = _descendants(root, "Page")
    size = None
    if pages and pages[0].get("WIDTH") and pages[0].get("HEIGHT"):
        size = (float(pages[0].get("WIDTH")), float(pages[0].get("HEIGHT")))
    lines = [_alto_line(line, i + 1) for i, line in enumerate(_descendants(root, "TextLine"))]
    return XmlPage(path, "alto", names[0].strip() if names else "", size, lines, tree)


def _read_page_xml(path: Path, tree: ET.ElementTree) -> XmlPage:
    page = next(iter(_descendants(tree.getroot(), "Page")), None)
    if page is None:
        raise DataError(f"{path}: PAGE XML without a <Page> element")
    size = None
    if page.get("imageWidth") and page.get("imageHeight"):
        size = (float(page.get("imageWidth")), float(page.get("imageHeight")))
    lines = [_page_line(line, i + 1) for i, line in enumerate(_descendants(page, "TextLine"))]
    return XmlPage(path, "page", page.get("imageFilename", "").strip(), size, lines, tree)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _xml_line_of(path: Path, text: str) -> str:
    """' (line N)': where `text` first appears in the file, for messages ('' if not found)."""
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if text in line:
                return f" (line {number})"
    except OSError:
        pass
    return ""


def find_image(page: XmlPage) -> Path:
    """The page image: as named (relative to the XML's folder, or only its file name there), else an
    image beside the XML with the XML's own name. The image must lie inside the page's
    `image_root` (by default the XML's folder): a named path that leaves it is refused (DataError
    naming the XML file and line), as is a page without any image found."""
    folder = page.path.parent
    root = (page.image_root or folder).resolve()
    tried, escaped = [], None
    if page.image_name:
        named = Path(page.image_name.replace("\\", "/"))
        candidate = named if named.is_absolute() else folder / named
        if _inside(candidate, root):
            tried.append(candidate)
        else:
            escaped = candidate
        tried.append(folder / named.name)
    tried += [page.path.with_suffix(suffix) for suffix in IMAGE_SUFFIXES]
    for candidate in tried:
        if candidate.is_file() and _inside(candidate, root):
            return candidate
    if escaped is not None:
        raise DataError(f"{page.path}{_xml_line_of(page.path, page.image_name)}: the page image path "
                        f"'{page.image_name}' leads outside {root}, refused; put the image beside the XML file "
                        f"or name the folder that holds it (data.xml.image_root, predict --image-root)")
    named = f" (the XML names '{page.image_name}')" if page.image_name else ""
    raise DataError(f"{page.path}: page image not found{named}; put it beside the XML file")


def line_region(line: XmlLine, band: tuple[float, float]) -> list[Point]:
    """The line's outline: polygon, else box, else a band of `band` = (above, below) px around the
    baseline. [] when the XML gives none of them."""
    if line.polygon:
        return line.polygon
    if line.box:
        x0, y0, x1, y1 = line.box
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if len(line.baseline) >= 2:
        above, below = band
        return [(x, y - above) for x, y in line.baseline] + [(x, y + below) for x, y in reversed(line.baseline)]
    return []


def _area(points: list[Point]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True))) / 2


def region_problem(points: list[Point], page_size: tuple[int, int]) -> str | None:
    """Why this region cannot be cropped from a page of `page_size`, or None."""
    if not points:
        return "no polygon, box or baseline"
    if not all(math.isfinite(value) for point in points for value in point):
        return "coordinates that are not finite numbers"
    if len(set(points)) < 3 or _area(points) < 1.0:
        return f"degenerate polygon ({len(set(points))} distinct points, no area)"
    width, height = page_size
    xs, ys = [x for x, _ in points], [y for _, y in points]
    tolerance = OUTSIDE_TOLERANCE
    if min(xs) < -tolerance or min(ys) < -tolerance or max(xs) > width + tolerance or max(ys) > height + tolerance:
        return (f"coordinates outside the {width}x{height} page (x {min(xs):g}..{max(xs):g}, y "
                f"{min(ys):g}..{max(ys):g}); does the XML belong to this image?")
    return None


def crop_region(image: Image.Image, points: list[Point]) -> Image.Image:
    """The region's bounding box of `image` (mode L), white outside the region."""
    width, height = image.size
    xs, ys = [x for x, _ in points], [y for _, y in points]
    left, top = max(0, int(min(xs))), max(0, int(min(ys)))
    right, bottom = min(width, int(max(xs)) + 1), min(height, int(max(ys)) + 1)
    crop = image.crop((left, top, right, bottom))
    mask = Image.new("L", crop.size, 0)
    ImageDraw.Draw(mask).polygon([(x - left, y - top) for x, y in points], fill=255)
    return Image.composite(crop, Image.new("L", crop.size, 255), mask)


@dataclass
class PageCrops:
    """What cropping one page gave: per usable line its id, text and crop; the problems."""

    ids: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def page_image(page: XmlPage) -> Image.Image:
    """The page's image, grayscale; DataError if it cannot be found or read."""
    image_path = find_image(page)
    return decode_image(image_path, str(image_path))


def crop_lines(page: XmlPage, image: Image.Image, band: tuple[float, float], need_text: bool = True) -> PageCrops:
    """Crop every line of `page` from its `image`. With `need_text`, lines without a transcription
    are problems too (training, evaluation); without, they are cropped (prediction)."""
    result = PageCrops()
    scale_x, scale_y = 1.0, 1.0
    if page.size and page.size != image.size:
        scale_x, scale_y = image.width / page.size[0], image.height / page.size[1]
    for line in page.lines:
        where = f"{page.path} line {line.id}"
        if need_text and line.text is None:
            result.problems.append(f"{where}: no transcription, line left out")
            continue
        if line.geometry_problem:
            result.problems.append(f"{where}: {line.geometry_problem}, line left out")
            continue
        region = [(x * scale_x, y * scale_y) for x, y in line_region(line, band)]
        problem = region_problem(region, image.size)
        if problem:
            result.problems.append(f"{where}: {problem}, line left out")
            continue
        result.ids.append(line.id)
        result.texts.append(line.text)
        result.crops.append(crop_region(image, region))
    return result


def crop_page(page: XmlPage, band: tuple[float, float]) -> PageCrops:
    """`crop_lines` for training and evaluation; a page image that cannot be read is a problem."""
    try:
        image = page_image(page)
    except DataError as err:
        return PageCrops(problems=[f"{err} ({len(page.lines)} line(s) left out)"])
    return crop_lines(page, image, band)


def xml_files(spec: str, key: str) -> list[Path]:
    """`data.train` etc. for source=xml: a folder of *.xml, a single file, or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(match) for match in glob.glob(str(path)) if match.endswith(".xml"))
    if not files:
        raise DataError(f"{key}: no XML files found at {spec} (a folder of *.xml, a file or a glob)")
    return files


def _png(image: Image.Image) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format="PNG", compress_level=1)
    return stream.getvalue()


def _cache_key(xml_path: Path, image_path: Path, band: tuple[float, float]) -> str:
    digest = hashlib.sha256()
    for part in (xml_path.read_bytes(), image_path.read_bytes(), json.dumps([band, CROP_VERSION]).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:32]


def _save_crops(folder: Path, crops: PageCrops) -> None:
    """Write a page's crops and manifest into a fresh folder, then rename it into place (so a
    folder that exists is complete; two runs writing the same page at once both succeed)."""
    temporary = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for i, crop in enumerate(crops.crops):
        crop.save(temporary / f"{i}.png", compress_level=1)
    manifest = {"ids": crops.ids, "texts": crops.texts, "problems": crops.problems,
                "sizes": [list(crop.size) for crop in crops.crops]}
    (temporary / "lines.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    try:
        os.replace(temporary, folder)
    except OSError:  # another process put it there first
        shutil.rmtree(temporary, ignore_errors=True)


@dataclass
class PageLines:
    """What one XML file gives a split: its usable lines (each crop as PNG bytes, or its file in
    the cache folder) and its problems; `read` is False when the file is no readable ALTO or PAGE."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    images: list[bytes | Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    read: bool = True


def page_lines(path: Path, band: tuple[float, float], cache_dir: Path | None,
               image_root: Path | None = None) -> PageLines:
    """Read one XML file and crop its lines, or take them from the cache folder if made before."""
    remembered = _remembered_crops(path, cache_dir, band, image_root) if cache_dir is not None else None
    if remembered is not None:
        return _cached_lines(path, remembered)
    try:
        page = read_page(path, image_root)
    except DataError as err:
        return PageLines(problems=[str(err)], read=False)
    if cache_dir is None:
        crops = crop_page(page, band)
        return PageLines([f"{path}:{i}" for i in crops.ids], crops.texts, [_png(c) for c in crops.crops],
                         [c.size for c in crops.crops], crops.problems)
    try:
        image = find_image(page)
        folder = cache_dir / _cache_key(path, image, band)
    except DataError as err:
        return PageLines(problems=[f"{err} ({len(page.lines)} line(s) left out)"])
    if not (folder / "lines.json").is_file():
        _save_crops(folder, crop_page(page, band))
    _remember_crops(path, image, folder, band, image_root)
    return _cached_lines(path, folder)


def _cached_lines(path: Path, folder: Path) -> PageLines:
    manifest = json.loads((folder / "lines.json").read_text(encoding="utf-8"))
    return PageLines([f"{path}:{i}" for i in manifest["ids"]], manifest["texts"],
                     [folder / f"{i}.png" for i in range(len(manifest["ids"]))],
                     [tuple(size) for size in manifest["sizes"]], manifest["problems"])


# A page's crops are found by the content of its XML and image files (`_cache_key`), which means
# reading both whole; at a million lines (tens of thousands of pages) that would be most of the
# start. So the cache also remembers, per XML file, the crops folder it led to and the size and
# modification time of the two files then: while neither has changed, the page is neither parsed
# nor read again.
def _memo_path(xml_path: Path, cache_dir: Path) -> Path:
    return cache_dir / "pages" / f"{hashlib.sha256(str(xml_path.resolve()).encode()).hexdigest()[:32]}.json"


def _stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _memo(xml_path: Path, image: Path | None, band: tuple[float, float], image_root: Path | None) -> dict:
    return {"version": CROP_VERSION, "band": list(band), "image_root": str(image_root or ""),
            "xml": _stamp(xml_path), "image": _stamp(image) if image else None}


def _remember_crops(xml_path: Path, image: Path, folder: Path, band: tuple[float, float],
                    image_root: Path | None) -> None:
    memo = {**_memo(xml_path, image, band, image_root), "folder": folder.name}
    try:
        atomic_write(_memo_path(xml_path, folder.parent),
                     lambda stream: stream.write(json.dumps(memo, ensure_ascii=False).encode("utf-8")))
    except OSError:
        pass  # only a shortcut: the next start reads the files again


def _remembered_crops(xml_path: Path, cache_dir: Path, band: tuple[float, float],
                      image_root: Path | None) -> Path | None:
    """The crops folder of an unchanged page, or None (then the page is read as the first time)."""
    try:
        memo = json.loads(_memo_path(xml_path, cache_dir).read_text(encoding="utf-8"))
        image = Path(memo["image"][0])
        if {**_memo(xml_path, image, band, image_root), "folder": memo["folder"]} != memo:
            return None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    folder = cache_dir / memo["folder"]
    return folder if (folder / "lines.json").is_file() else None


def map_pages(job, paths: list[Path], workers: int):
    """`job` over `paths` in order, in `workers` forked processes when there are several pages
    (cropping is CPU-bound: about 0.15 s a page on one core); in this process otherwise."""
    workers = min(workers, len(paths))
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(job, paths)
        return
    # fork: the children need no imports; they only read files and run PIL, no torch or threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(job, paths, chunksize=max(1, len(paths) // (8 * workers)))


class XmlRecords(LineRecords):
    """The lines of a split of ALTO / PAGE XML pages (see the module docstring), cropped in
    `workers` processes."""

    def __init__(self, spec: str, key: str, band: tuple[float, float], cache_dir: str = "",
                 show_progress: bool = True, workers: int = 0, image_root: str = ""):
        self.name, self.problems, self.texts, self.ids = spec, [], [], []
        self._images: list[bytes | Path] = []  # a crop as PNG bytes, or its file in the cache
        self._sizes: list[tuple[int, int]] = []
        self.pages = 0
        paths = xml_files(spec, key)
        job = functools.partial(page_lines, band=band, cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
                                image_root=Path(image_root).expanduser() if image_root else None)
        for lines in progress(map_pages(job, paths, workers), f"{key}: cropping lines", show_progress, len(paths)):
            self.pages += lines.read
            self.ids += lines.ids
            self.texts += lines.texts
            self._images += lines.images
            self._sizes += lines.sizes
            self.problems += lines.problems
        if not self.texts:
            raise DataError(f"{key}: no usable text lines in {spec} ({len(self.problems)} problem(s); first: "
                            f"{' | '.join(self.problems[:3]) or '-'})")

    def image(self, index: int) -> Image.Image:
        return decode_image(self._images[index], self.ids[index])

    def sizes(self) -> list[tuple[int, int]]:
        return list(self._sizes)


def _namespaces(path: Path) -> dict[str, str]:
    """The prefixes a file declares, so that writing it back keeps them (ElementTree would invent
    ns0, ns1, ...)."""
    return dict(node for _, node in ET.iterparse(path, events=("start-ns",)))


@dataclass
class LineConfidence:
    """How sure a reading is, as the page formats carry it: the line's (0-1) and each character's."""

    line: float
    characters: list[float]

    def alto_cc(self) -> str:
        """ALTO `CC`: per character 0 (sure) to 9 (unsure), space-separated."""
        return " ".join(str(min(9, max(0, round((1.0 - c) * 9)))) for c in self.characters)


def write_page(page: XmlPage, texts: dict[str, str], out_path: Path,
               confidences: dict[str, LineConfidence] | None = None) -> int:
    """Write `page` to `out_path` with `texts` (line id -> recognised text) as the transcription of
    those lines: ALTO, one `String` per line (with the line's box, and with `confidences` its `WC`
    and `CC`); PAGE, the line's `TextEquiv` (with its `conf`).
    The lines' former words and transcriptions are replaced; the file is written whole or not at
    all (`atomic_write`). Returns the lines written."""
    for prefix, uri in _namespaces(page.path).items():
        ET.register_namespace(prefix, uri)
    written = 0
    for line in page.lines:
        if line.id not in texts:
            continue
        confidence = (confidences or {}).get(line.id)
        if page.kind == "alto":
            _set_alto_text(line.element, texts[line.id], confidence)
        else:
            _set_page_text(line.element, texts[line.id], confidence)
        written += 1
    atomic_write(out_path, lambda stream: page.tree.write(stream, encoding="UTF-8", xml_declaration=True))
    return written


def _set_alto_text(line: ET.Element, text: str, confidence: LineConfidence | None) -> None:
    for child in [c for c in line if _local(c.tag) in ("String", "SP", "HYP")]:
        line.remove(child)
    string = ET.SubElement(line, line.tag[: -len("TextLine")] + "String")
    for key in ("HPOS", "VPOS", "WIDTH", "HEIGHT"):
        if line.get(key) is not None:
            string.set(key, line.get(key))
    string.set("CONTENT", text)
    if confidence is not None:
        string.set("WC", f"{confidence.line:.4f}")
        if len(confidence.characters) == len(text) and text:
            string.set("CC", confidence.alto_cc())


def _set_page_text(line: ET.Element, text: str, confidence: LineConfidence | None) -> None:
    namespace = line.tag[: -len("TextLine")]
    for child in [c for c in line if _local(c.tag) in ("Word", "TextEquiv")]:
        line.remove(child)
    equiv = ET.Element(namespace + "TextEquiv")
    if confidence is not None:
        equiv.set("conf", f"{confidence.line:.4f}")
    ET.SubElement(equiv, namespace + "Unicode").text = text
    later = [i for i, c in enumerate(line) if _local(c.tag) in ("TextStyle", "UserDefined", "Labels")]
    line.insert(later[0] if later else len(line), equiv)
