"""Lecture decks rendered for a room without internet: `python -m autograder slides [LAB ...] [--out DIR]`.

Each deck (slides/<lab>.ipynb) is executed (against the reference in the instructor's kit, against the student's code
in the student release: `--target`), then exported as reveal.js slides with the kit's template
(autograder/templates/slm_reveal): reveal.js itself is copied beside the decks from the sphinx-revealjs package (a
pinned dependency), LaTeX in markdown is rendered to MathML by latex2mathml (browsers draw MathML natively), and
nothing is fetched from a CDN. A deck cell that raises (a stub not implemented yet) shows the error's last line on its
slide instead of stopping the render. Decks are 1280x720.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from autograder.runner import KIT_ROOT, GraderError

SLIDES_DIR = KIT_ROOT / "slides"
TEMPLATES = Path(__file__).resolve().parent / "templates"
WIDTH, HEIGHT = 1280, 720
REVEAL_DIR = "reveal.js"  # beside the rendered decks

_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?!\s)([^$\n]+?)(?<!\s)\$(?!\w)")
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)


def reveal_assets() -> Path:
    """The reveal.js distribution that the sphinx-revealjs package ships."""
    try:
        import sphinx_revealjs
    except ImportError:
        raise GraderError("rendering decks needs sphinx-revealjs (a dependency of the kit): pip install -e .") from None
    folder = Path(sphinx_revealjs.__file__).parent / "_static" / "revealjs"
    if not (folder / "dist" / "reveal.js").exists():
        raise GraderError(f"no reveal.js found in {folder}")
    return folder


def tex_to_mathml(markdown: str) -> str:
    """$$...$$ and $...$ outside code become MathML (an unparsable formula stays as code, never vanishes)."""
    from latex2mathml.converter import convert

    def render(tex: str, display: bool) -> str:
        try:
            mathml = convert(tex.strip())
        except Exception:  # noqa: BLE001 - latex2mathml raises several types; the TeX then shows as code
            return f"<code>{tex}</code>"
        return mathml.replace('display="inline"', 'display="block"', 1) if display else mathml

    pieces = _CODE.split(markdown)
    for index in range(0, len(pieces), 2):  # even pieces are outside code spans
        text = _DISPLAY.sub(lambda m: render(m.group(1), True), pieces[index])
        pieces[index] = _INLINE.sub(lambda m: render(m.group(1), False), text)
    return "".join(pieces)


def render_deck(deck: Path, out_dir: Path, *, target: str | None = None, timeout: int = 600) -> Path:
    """Execute `deck` and write `out_dir/<name>.slides.html` (reveal.js copied to out_dir once)."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import SlidesExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / REVEAL_DIR).exists():
        assets = reveal_assets()
        for part in ("dist", "plugin"):
            shutil.copytree(assets / part, out_dir / REVEAL_DIR / part)
    notebook = nbformat.read(deck, as_version=4)
    env_target = os.environ.get("SLM_TARGET")
    if target is not None:
        os.environ["SLM_TARGET"] = target  # the kernel inherits it: presenter_target() reads it
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(deck.parent)}}).execute()
    finally:
        if target is not None:
            if env_target is None:
                os.environ.pop("SLM_TARGET", None)
            else:
                os.environ["SLM_TARGET"] = env_target
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = tex_to_mathml(cell.source)
        elif cell.cell_type == "code":
            for output in cell.get("outputs", []):
                if output.output_type == "error":
                    # a stub raising NotImplementedError: one line on the slide, not a screen of traceback
                    output.traceback = [f"{output.ename}: {output.evalue}"]
    exporter = SlidesExporter(template_name="slm_reveal", extra_template_basedirs=[str(TEMPLATES)],
                              reveal_url_prefix=REVEAL_DIR, reveal_width=str(WIDTH), reveal_height=str(HEIGHT),
                              reveal_theme="simple")
    html, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": deck.stem}})
    path = out_dir / f"{deck.stem}.slides.html"
    path.write_text(html)
    return path


def decks(labs: list[str] | None = None) -> list[Path]:
    found = sorted(SLIDES_DIR.glob("lab*.ipynb"))
    if labs:
        found = [d for d in found if d.stem in labs]
    return found


# -----------------------------------------------------------------------------
# Checking a rendered deck in a real browser

_CHECKER = """
<script>
function slmCheck() {
  var size = Reveal.getComputedSlideSize(), problems = [];
  Reveal.getSlides().forEach(function (slide, index) {
    var at = Reveal.getIndices(slide);
    Reveal.slide(at.h, at.v || 0);
    var title = (slide.querySelector('h1, h2, h3') || {textContent: 'slide ' + (index + 1)}).textContent;
    if (slide.scrollHeight > size.height + 2) {
      problems.push({slide: index + 1, title: title, what: 'taller than the slide',
                     px: slide.scrollHeight, max: size.height});
    }
    slide.querySelectorAll('pre, img, table').forEach(function (el) {
      var box = el.getBoundingClientRect(), frame = slide.getBoundingClientRect();
      var cut = el.tagName === 'PRE' ? el.scrollWidth > el.clientWidth + 2 : box.right > frame.right + 2;
      if (cut) {
        problems.push({slide: index + 1, title: title, what: el.tagName.toLowerCase() + ' cut on the right',
                       px: Math.max(el.scrollWidth, box.right - frame.left), max: el.clientWidth});
      }
    });
  });
  document.body.setAttribute('data-overflow', JSON.stringify(problems));
  document.body.setAttribute('data-slides', String(Reveal.getTotalSlides()));
}
if (Reveal.isReady()) { slmCheck(); } else { Reveal.on('ready', slmCheck); }
</script>
"""


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def check_in_browser(html_path: Path, *, screenshot: Path | None = None) -> dict:
    """Open a rendered deck in headless Chromium at 1280x720; report every slide whose content overflows it.

    Returns {"slides": n, "overflow": [...], "external": [...]}: external lists any http(s) resource it loads."""
    import json
    import subprocess

    browser = find_browser()
    if browser is None:
        raise GraderError("checking decks needs Chromium (Debian: apt-get install chromium)")
    html = html_path.read_text()
    external = sorted(set(re.findall(r'(?:src|href)="(https?://[^"]+)"', html)))
    probe = html_path.with_name(html_path.stem + ".check.html")
    # after reveal.js's own scripts, which the template puts after </body>
    probe.write_text(html.replace("</html>", _CHECKER + "</html>", 1) if "</html>" in html else html + _CHECKER)
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
             f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=20000", "--disable-extensions",
             "--proxy-server=127.0.0.1:9", "--no-first-run"]  # an unreachable proxy: nothing loads from outside
    try:
        dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
        if screenshot is not None:
            subprocess.run([*flags, f"--screenshot={screenshot}", html_path.as_uri()], capture_output=True,
                           timeout=180)
    finally:
        probe.unlink(missing_ok=True)
    overflow = re.search(r'data-overflow="([^"]*)"', dom.stdout)
    slides = re.search(r'data-slides="(\d+)"', dom.stdout)
    if overflow is None or slides is None:
        raise GraderError(f"the deck {html_path.name} did not start in the browser (reveal.js not loaded?):\n"
                          f"{dom.stderr[-1500:]}")
    problems = json.loads(overflow.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return {"slides": int(slides.group(1)), "overflow": problems, "external": external}
