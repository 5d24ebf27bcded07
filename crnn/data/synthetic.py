"""Synthetic handwriting-like text lines, so the demo trains with no downloads.

`sample_text` draws a line of English-like text; `render_line` draws it with the stroke fonts of the
`Hershey-Fonts` package as a random writer would, every stroke point moved before Pillow draws it
supersampled. All randomness comes from the caller's `random.Random`: reproducible, pixel for pixel.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from HersheyFonts import HersheyFonts
from PIL import Image, ImageDraw, ImageFilter

WORDS: tuple[str, ...] = tuple("""
    the of and to a in is it you that he was for on are with as his they be at one have this from or had
    by hot but some what there we can out other were all your when up use word how said an each she which
    do their time if will way about many then them would write like so these her long make thing see him
    two has look more day could go come did my sound no most number who over know water than call first
    people may down side been now find any new work part take get place made live where after back little
    only round man year came show every good me give our under name very through just form much great
    think say help low line before turn cause same mean move right boy old too does tell sentence set
    three want air well also play small end put home read hand large add even land here must big high
    such follow act why ask men change went light kind off need house picture try us again animal point
    mother world near build earth father head stand own page should country found answer school grow
    study still learn plant cover food sun four thought let keep eye never last door between city tree
    cross since hard start might story saw far sea draw left late run while press close night real life
    few stop open seem together next white children begin got walk example paper often always music those
    both mark book letter until mile river car feet care second group carry took rain eat room friend
    began idea fish mountain north once base hear horse cut sure watch colour face wood main enough plain
    girl usual young ready above ever red list though feel talk bird soon body dog family direct leave
    song measure state product black short class wind question happen complete ship area half rock order
    fire south problem piece told knew pass farm top whole king size heard best hour better true during
    hundred am remember step early hold west ground interest reach fast five sing listen six table travel
    less morning ten simple several toward war lay against pattern slow center love person money serve
    appear road map science rule pull cold notice voice fall power town fine certain fly unit lead cry
    dark machine note wait plan figure star box field rest correct able pound done beauty drive stood
    contain front teach week final gave green oh quick develop sleep warm free minute strong special mind
    behind clear tail produce fact street inch lot nothing course stay wheel full force blue object
    decide surface deep moon island foot yet busy test record boat common gold possible plane age dry
    wonder laugh thousand ago ran check game shape yes cool miss brought heat snow bed bring sit perhaps
    fill east weight language among wife husband garden window evening kitchen summer winter spring
    autumn village market church office doctor teacher student history government party member report
    council company business price policy public private service system national local general political
    social economic important different available likely particular recent major human gentle bright
    heavy narrow broad empty famous foreign modern ancient sudden silent proud honest careful afraid
    angry happy sorry tired hungry lovely pretty ugly rich poor wild calm dear quiet loud soft sweet
    bitter fresh clean dirty thick thin wide flat square smooth rough sharp dull already almost although
    another anything anyone anyway around away because become believe below beside beyond brother sister
    daughter son uncle aunt cousin baby child woman women lady gentleman master servant captain soldier
    officer army navy battle peace victory enemy danger safety trouble matter reason purpose result
    effect chance choice silence secret truth lie promise hope fear doubt faith trust joy sorrow anger
    pride shame pity mercy grace glory honour duty wrong justice law court judge prison crime police
    evidence witness message news magazine journal novel poem chapter title author reader editor desk
    chair lamp candle plate cup glass bottle bread butter cheese meat milk tea coffee sugar salt apple
    orange lemon potato cabbage onion flower rose grass leaf branch root seed forest valley hill lake
    ocean shore beach wave storm cloud thunder sky shadow noon afternoon midnight today tomorrow
    yesterday month season monday tuesday wednesday thursday friday saturday sunday january february
    march april june july august september october november december holiday birthday wedding funeral
    dinner breakfast lunch meal feast dance sport match race ticket train station platform engine bicycle
    bridge tower castle palace cottage hotel hospital library museum theatre cinema shop store bank
    factory coast border nation empire kingdom republic queen prince princess duke lord bishop minister
    president parliament election vote campaign crowd meeting speech debate argument agreement decision
    opinion theory amount degree level rate cost value profit loss trade industry labour worker tax
    budget bill account payment cash coin dollar quite rather really simply surely truly nearly hardly
    merely mostly partly fairly indeed however therefore otherwise instead moreover meanwhile suddenly
    slowly quickly quietly gently softly loudly clearly carefully easily happily badly certainly probably
    possibly exactly especially usually finally later seldom sometimes everywhere nowhere somewhere
    inside outside upstairs downstairs across along beneath upon within without throughout towards unless
    whether either neither nor whose whom whatever whenever wherever everything something nobody somebody
    everyone someone accept allow arrive attack avoid bake borrow breathe burn buy catch climb collect
    cook count deliver depend describe destroy discover enjoy enter escape explain fail fight finish
    forget forgive gather guess hang hate hide hunt hurry imagine include invite join jump kill kiss
    knock lend lift lose marry mention mix offer pack pay pick prefer prepare pretend protect prove push
    raise receive refuse remain repair repeat reply rescue return ride ring rise rush save scream search
    sell send shake shout sink smile smoke spend steal suggest supply suppose surprise swim taste tear
    thank throw touch visit wash waste wear whisper win wish worry wrap
""".split())

# apostrophes inside words, which WORDS never contain
_CONTRACTIONS = tuple("it's don't can't I'm isn't won't didn't that's there's I'll we're you're he's she's let's "
                      "wasn't couldn't I've doesn't we'll".split())
_DRAWABLE = frozenset(chr(code) for code in range(32, 127))  # every Hershey font draws printable ASCII
# relative draw probabilities: script faces look most like handwriting, the others are writers who print
_FONT_WEIGHTS = {"cursive": 3.0, "scripts": 2.5, "scriptc": 2.0, "timesi": 1.2, "futural": 1.0,
                 "rowmans": 0.8, "futuram": 0.6, "timesr": 0.4, "timesib": 0.4}
# Slant the italic and script faces already have, so that the drawn slant is the writer's.
_BUILT_IN_SLANT = {"cursive": 0.3, "scripts": 0.3, "scriptc": 0.3, "timesi": 0.25, "timesib": 0.25}

# Hershey font units: y grows downwards; these lines are shared by all the fonts used here.
_CAP_LINE = -12.0
_BASE_LINE = 9.0

_MIN_CLEARANCE = 1.5  # pixels kept free above and below the ink, plus twice the blur radius
_MIN_PEN = 0.9  # pixels: thinner strokes vanish at small heights


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        return str(rng.randint(1900, 2029))
    if kind < 0.65:
        return str(rng.choice((rng.randint(0, 20), rng.randint(0, 999))))
    if kind < 0.85:
        return f"{rng.randint(0, 99)}.{rng.randint(1, 99) if rng.random() < 0.3 else rng.randint(1, 9)}"
    return f"{rng.randint(1, 12)}:{rng.choice((0, 15, 30, 45, rng.randint(0, 59))):02d}"


def _word(rng: random.Random, capitalise: bool) -> str:
    """A word, a contraction, a hyphenated pair or a number; capitalised when asked."""
    kind = rng.random()
    if kind < 0.07:
        return _number(rng)
    if kind < 0.10:
        word = rng.choice(_CONTRACTIONS)
    elif kind < 0.13:
        word = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
    elif kind < 0.14:
        word = "I"
    else:
        word = rng.choice(WORDS)
    if rng.random() < 0.01:
        return word.upper()
    if capitalise or rng.random() < 0.1:
        return word[0].upper() + word[1:]
    return word


def _trailing_punctuation(rng: random.Random, last: bool) -> str:
    marks = ((".", 0.35), ("?", 0.42), ("!", 0.46)) if last else (  # (mark, cumulative probability)
        (",", 0.1), (".", 0.14), (";", 0.155), (":", 0.165), ("!", 0.175), ("?", 0.19))
    roll = rng.random()
    return next((mark for mark, bound in marks if roll < bound), "")


def sample_text(rng: random.Random, min_words: int = 2, max_words: int = 7) -> str:
    """A line of `min_words` to `max_words` words from WORDS, some capitalised, some numbers ('1987',
    '3.5', '12:30'), with punctuation ('word,' '(word)' '"word"' "it's" 'well-known')."""
    count = rng.randint(min_words, max_words)
    tokens: list[str] = []
    capitalise = rng.random() < 0.8  # most lines start a sentence, some continue one
    closer = ""  # the ')' or '"' still to come after an opened bracket or quote
    for index in range(count):
        last = index == count - 1
        if 0 < index and not last and rng.random() < 0.012:
            tokens.append("-")  # a dash between words
        token = _word(rng, capitalise)
        if not closer and rng.random() < 0.05:
            opener = rng.choice('("')
            token, closer = opener + token, ")" if opener == "(" else '"'
        if closer and (last or rng.random() < 0.5):
            token, closer = token + closer, ""
        token += _trailing_punctuation(rng, last)
        capitalise = token[-1] in ".!?"
        tokens.append(token)
    return " ".join(tokens)


@dataclass(frozen=True)
class _Glyph:
    points: np.ndarray  # (n, 2) float64, every stroke's points in order, x from the left side
    stroke_lengths: np.ndarray  # points in each stroke
    advance: float


@dataclass(frozen=True)
class _Font:
    glyphs: dict[str, _Glyph]
    x_height_top: float  # y of the top of lower-case 'x'
    descender: float  # y of the bottom of 'g'


@functools.cache
def _load_font(name: str) -> _Font:
    """Glyph geometry of one font as numpy arrays, parsed once per process."""
    hershey = HersheyFonts()
    hershey.load_default_font(name)
    raw = hershey.all_glyphs
    x_height_top = float(min(y for stroke in raw["x"].strokes for _, y in stroke))
    glyphs = {}
    for char in _DRAWABLE - {" "}:
        strokes = [np.asarray(stroke, dtype=np.float64) for stroke in raw[char].strokes if len(stroke)]
        points = np.concatenate(strokes)
        points[:, 0] -= raw[char].left_offset
        advance = float(raw[char].char_width)
        if char == "-":  # Hershey's is a long dash, at x-height in script faces: halve it, centre it
            points[:, 0] *= 0.5
            points[:, 1] = (x_height_top + _BASE_LINE) / 2
            advance *= 0.5
        glyphs[char] = _Glyph(points, np.array([len(stroke) for stroke in strokes], dtype=np.int64), advance)
    return _Font(glyphs, x_height_top, float(max(y for stroke in raw["g"].strokes for _, y in stroke)))


@dataclass(frozen=True)
class _Style:
    """One writer's habits. Lengths are in font units (a capital letter is 21 high)."""

    font_name: str
    slant: float  # horizontal shift per unit of height above the baseline
    width_factor: float  # horizontal stretch of every glyph
    x_height_factor: float  # stretch of the lower-case band, ascenders and descenders kept
    size_factor: float  # share of the image height the font's cap-to-descender band fills
    char_scale_sd: float
    char_shift_sd: float  # vertical jitter of whole characters
    char_slant_sd: float  # letters that do not all lean the same way
    shake_sd: float  # jitter of single stroke points: a shaky hand
    warp: tuple[float, ...]  # (amplitude, wavelength, phase, phase): smooth bending of letter shapes
    letter_space: float
    word_space: float
    wobble: tuple[float, ...]  # (amplitude, period, phase) of two sines bending the baseline
    tilt: float  # baseline rise per unit of line length
    pen_width: float
    ink: float  # grey level of the ink, 0 = black
    ink_fade: float  # how much lighter the ink gets where the pen runs dry
    paper: float
    paper_grain: float  # per-pixel noise
    paper_blotch: float  # smooth, low-frequency unevenness
    blur: float  # Gaussian radius in output pixels, 0 for none
    margins: tuple[int, int]  # left and right, output pixels


def _sample_style(rng: random.Random) -> _Style:
    font_name = rng.choices(tuple(_FONT_WEIGHTS), weights=tuple(_FONT_WEIGHTS.values()))[0]
    script = font_name in ("cursive", "scripts", "scriptc")
    writer_slant = rng.triangular(-0.1, 0.45, 0.15)
    letter_space = rng.uniform(-1.0, 1.5) if script else rng.uniform(-1.0, 3.0)
    # word gaps must stay clearly wider than letter gaps, or spaces cannot be learnt
    word_space = (rng.uniform(8.0, 13.0) if script else rng.uniform(6.0, 12.0)) + 1.5 * max(letter_space, 0.0)
    return _Style(
        font_name=font_name,
        slant=writer_slant - _BUILT_IN_SLANT.get(font_name, 0.0),
        width_factor=rng.uniform(0.9, 1.2),
        # script faces have a small x-height and connect letters, so they take more of a stretch
        x_height_factor=rng.uniform(0.9, 1.3) if script else rng.uniform(0.88, 1.08),
        size_factor=rng.uniform(0.8, 1.0),
        char_scale_sd=rng.uniform(0.0, 0.05),
        char_shift_sd=rng.uniform(0.0, 0.8),
        char_slant_sd=rng.uniform(0.0, 0.06),
        shake_sd=rng.uniform(0.0, 0.35) if rng.random() < 0.7 else 0.0,
        warp=(rng.uniform(0.0, 0.9), rng.uniform(12.0, 30.0), rng.uniform(0.0, 2 * math.pi),
              rng.uniform(0.0, 2 * math.pi)),
        letter_space=letter_space,
        word_space=word_space,
        wobble=(rng.uniform(0.0, 1.5), rng.uniform(120.0, 400.0), rng.uniform(0.0, 2 * math.pi),
                rng.uniform(0.0, 0.6), rng.uniform(30.0, 80.0), rng.uniform(0.0, 2 * math.pi)),
        tilt=rng.uniform(-0.006, 0.006),
        pen_width=rng.uniform(0.9, 2.6),
        ink=rng.uniform(0.0, 60.0),
        ink_fade=rng.uniform(0.0, 25.0),
        paper=rng.uniform(225.0, 252.0),
        paper_grain=rng.uniform(0.0, 6.0),
        paper_blotch=rng.uniform(0.0, 6.0),
        blur=rng.uniform(0.2, 0.7) if rng.random() < 0.4 else 0.0,
        margins=(rng.randint(2, 8), rng.randint(2, 8)),
    )


def _stretch_x_height(y: np.ndarray, x_height_top: float, factor: float) -> np.ndarray:
    """Scale the band between x-height and baseline by `factor`, keeping the cap line and the
    descenders where they are, as writers with small or large lower-case letters do."""
    new_top = _BASE_LINE + (x_height_top - _BASE_LINE) * factor
    upper_scale = (new_top - _CAP_LINE) / (x_height_top - _CAP_LINE)
    lower_case = np.where(y <= _BASE_LINE, _BASE_LINE + (y - _BASE_LINE) * factor, y)
    return np.where(y >= x_height_top, lower_case, new_top + (y - x_height_top) * upper_scale)


def _layout(text: str, font: _Font, style: _Style,
            rng: random.Random) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every point of the line, in font units, the index one past each stroke's end, and the word
    (counted from 0, words split at spaces) of each point."""
    glyphs, placements, cursor = [], [], 0.0
    words = [len(text[: i + 1].split()) - 1 for i, char in enumerate(text) if char != " "]
    for char in text:
        if char == " ":
            cursor += style.word_space * rng.uniform(0.8, 1.25)
            continue
        glyph = font.glyphs[char]
        scale = max(0.85, rng.gauss(1.0, style.char_scale_sd))
        glyphs.append(glyph)
        placements.append((cursor, rng.gauss(0.0, style.char_shift_sd), scale,
                           rng.gauss(0.0, style.char_slant_sd)))
        cursor += glyph.advance * scale * style.width_factor + style.letter_space
    points = np.concatenate([glyph.points for glyph in glyphs])
    per_point = np.repeat(np.asarray(placements), [len(glyph.points) for glyph in glyphs], axis=0)
    y = _stretch_x_height(points[:, 1], font.x_height_top, style.x_height_factor)
    points[:, 0] = (points[:, 0] * per_point[:, 2] * style.width_factor + per_point[:, 0]
                    + per_point[:, 3] * (_BASE_LINE - y))
    points[:, 1] = _BASE_LINE + (y - _BASE_LINE) * per_point[:, 2] + per_point[:, 1]
    word_of_point = np.repeat(words, [len(glyph.points) for glyph in glyphs])
    return points, np.cumsum(np.concatenate([glyph.stroke_lengths for glyph in glyphs])), word_of_point


def _distort(points: np.ndarray, style: _Style, noise: np.random.Generator) -> np.ndarray:
    """Bent letter shapes, shaky strokes, slant, and a baseline that drifts and waves."""
    if style.shake_sd > 0:
        points = points + noise.normal(0.0, style.shake_sd, points.shape)
    x, y = points[:, 0], points[:, 1]
    # a smooth displacement field a few letters wide: each writer forms the letters differently
    amplitude, wavelength, phase_x, phase_y = style.warp
    frequency = 2 * math.pi / wavelength
    x, y = (x + amplitude * np.sin(y * frequency + phase_x + x * (frequency * 0.37)),
            y + amplitude * np.sin(x * frequency + phase_y + y * (frequency * 0.53)))
    # slant before the baseline bends, so letters lean relative to where they sit
    x = x + style.slant * (_BASE_LINE - y)
    amp1, period1, phase1, amp2, period2, phase2 = style.wobble
    y = (y + amp1 * np.sin(x * (2 * math.pi / period1) + phase1)
         + amp2 * np.sin(x * (2 * math.pi / period2) + phase2) + style.tilt * x)
    return np.stack((x, y), axis=1)


def _fit_to_height(points: np.ndarray, font: _Font, style: _Style, height: int,
                   rng: random.Random) -> tuple[np.ndarray, float, int]:
    """Pixel coordinates, pen width in pixels and image width. The text is as large as the
    writer's size asks, shrunk only where the line would not fit: nothing may be clipped."""
    clearance = _MIN_CLEARANCE + 2 * style.blur
    scale = (height - 2 * clearance) * style.size_factor / (font.descender - _CAP_LINE)
    pen = max(style.pen_width * scale, _MIN_PEN)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = min(scale, (height - 2 * clearance - pen) / max(high[1] - low[1], 1e-6))
    # the writer's own vertical position, then pushed inside the image if it pokes out
    centre = (_CAP_LINE + font.descender) / 2
    top = height / 2 - centre * scale + rng.uniform(-0.04, 0.04) * height
    top = max(top, clearance + pen / 2 - low[1] * scale)
    top = min(top, height - clearance - pen / 2 - high[1] * scale)
    left = style.margins[0] + pen / 2 - low[0] * scale
    width = math.ceil((high[0] - low[0]) * scale + pen + sum(style.margins))
    return points * scale + (left, top), pen, width


def _draw_strokes(pixels: np.ndarray, stroke_ends: np.ndarray, pen: float, width: int,
                  height: int) -> Image.Image:
    """Ink coverage (255 = full), drawn supersampled and box-filtered down for antialiasing."""
    supersample = 2 if height >= 48 else 3
    canvas = Image.new("L", (width * supersample, height * supersample), 0)
    draw = ImageDraw.Draw(canvas)
    pen_pixels = max(1, round(pen * supersample))
    pixels = pixels * supersample
    for stroke in np.split(pixels, stroke_ends[:-1]):
        draw.line(stroke.ravel().tolist(), fill=255, width=pen_pixels)
    if pen_pixels >= 3:
        # Pillow draws wide polylines as separate quads: round off the ends and the corners
        # (not every point: that would double the cost for an invisible difference)
        radius = pen_pixels / 2 - 0.5
        for x, y in _ends_and_corners(pixels, stroke_ends).tolist():
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return canvas.reduce(supersample)


def _ends_and_corners(pixels: np.ndarray, stroke_ends: np.ndarray) -> np.ndarray:
    """The points where a stroke starts, ends or turns by more than about 25 degrees."""
    selected = np.zeros(len(pixels), dtype=bool)
    selected[stroke_ends - 1] = True
    selected[np.concatenate(([0], stroke_ends[:-1]))] = True
    incoming, outgoing = pixels[1:-1] - pixels[:-2], pixels[2:] - pixels[1:-1]
    dot = np.einsum("ij,ij->i", incoming, outgoing)
    lengths = np.hypot(incoming[:, 0], incoming[:, 1]) * np.hypot(outgoing[:, 0], outgoing[:, 1])
    selected[1:-1] |= dot < 0.9 * lengths
    return pixels[selected]


def _ink_on_paper(coverage_image: Image.Image, style: _Style, noise: np.random.Generator) -> Image.Image:
    """Grey paper with grain and blotches, and ink that fades and darkens along the line."""
    if style.blur > 0:
        coverage_image = coverage_image.filter(ImageFilter.GaussianBlur(style.blur))
    coverage = np.asarray(coverage_image, dtype=np.float32) * np.float32(1 / 255)
    height, width = coverage.shape
    paper = noise.standard_normal((height, width), dtype=np.float32) * np.float32(style.paper_grain)
    paper += np.float32(style.paper)
    # blotches: coarse noise, smoothly upsampled, so it costs a fraction of the pixels
    coarse = noise.standard_normal((height // 16 + 2, width // 16 + 2), dtype=np.float32)
    coarse *= np.float32(style.paper_blotch)
    paper += np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    period, phase = noise.uniform(0.5, 2.0) * height * 6, noise.uniform(0.0, 2 * math.pi)
    columns = np.arange(width, dtype=np.float32) * np.float32(2 * math.pi / period) + np.float32(phase)
    ink = np.float32(style.ink) + np.float32(style.ink_fade / 2) * (1 + np.sin(columns))
    paper += (ink - paper) * coverage
    return Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))


def render_line(text: str, rng: random.Random, height: int = 64) -> Image.Image:
    """`text` as one handwriting-like line: a mode 'L' image exactly `height` pixels high, as wide
    as the text needs, dark ink (~0-90) on white-ish paper (~200-255); the same text and `rng` state
    give the same image. ValueError for text without a visible character or with one that is not
    printable ASCII (all the Hershey fonts draw), or a height under 12."""
    return render_line_words(text, rng, height)[0]


def render_line_words(text: str, rng: random.Random,
                      height: int = 64) -> tuple[Image.Image, list[tuple[float, float]]]:
    """`render_line`'s image (the same for the same `rng` state) and where each word of
    `text.split()` was drawn: (left, right) of its ink in pixels, the pen's width included."""
    if not text.strip() or not _DRAWABLE.issuperset(text):
        raise ValueError(f"render_line draws printable ASCII with a visible character, got {text!r}")
    if height < 12:
        raise ValueError(f"render_line needs height >= 12 pixels, got {height}")
    style = _sample_style(rng)
    font = _load_font(style.font_name)
    noise = np.random.default_rng(rng.getrandbits(64))
    points, stroke_ends, word_of_point = _layout(text, font, style, rng)
    points = _distort(points, style, noise)
    pixels, pen, width = _fit_to_height(points, font, style, height, rng)
    coverage = _draw_strokes(pixels, stroke_ends, pen, width, height)
    xs = [pixels[word_of_point == word, 0] for word in range(len(text.split()))]
    words = [(float(x.min() - pen / 2), float(x.max() + pen / 2)) for x in xs]
    return _ink_on_paper(coverage, style, noise), words
