"""Run notebooks and save their outputs (pictures, tables, printed figures) into them, so that readers see the
results without running anything. Cells flagged with a test flag from settings.ini (`#| slow`, `#| cuda`) or
`#| eval: false` are skipped, as under nbdev_test; their outputs stay empty.

Usage: python tools/run_notebooks.py [NOTEBOOK ...]     (default: every nbs/*.ipynb)
Then run nbdev_clean (make notebooks does both). A development tool: it needs execnb, the library does not.
"""
import configparser, os, re, sys, time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parents[1]
cfg = configparser.ConfigParser()
cfg.read(ROOT / 'settings.ini')
FLAGS = set(cfg['DEFAULT'].get('tst_flags', '').split('|')) - {''}
DIRECTIVE = re.compile(r'^\s*#\|\s*(.+?)\s*$')


def skip(cell) -> bool:
    "True for cells nbdev_test would not run."
    if cell.cell_type != 'code': return True
    words = set()
    for line in cell.source.splitlines():
        m = DIRECTIVE.match(line)
        if m: words.update(m.group(1).replace(':', ': ').split())
    if FLAGS & words: return True
    src = cell.source.replace(' ', '')
    return '#|eval:false' in src.lower() or 'nbdev_export(' in cell.source


def run(path: Path) -> float:
    "Execute one notebook in its own folder and write it back with outputs; seconds taken."
    nb = read_nb(path)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = []
    t0, cwd = time.time(), os.getcwd()
    shell = CaptureShell(path, mpl_format='jpeg')           # JPEG figures: photos and flow fields stay small
    try:
        os.chdir(path.parent)
        shell.run_all(nb, exc_stop=True, preproc=skip)
    finally:
        os.chdir(cwd)
    if shell.exc: raise RuntimeError(f'{path.name}: a cell raised {shell.exc!r}')
    write_nb(nb, path)
    return time.time() - t0


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a).resolve() for a in args] or sorted((ROOT / 'nbs').glob('*.ipynb'))
    os.environ.setdefault('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
    for p in paths:
        print(f'{p.name}: {run(p):.0f} s', flush=True)


if __name__ == '__main__':
    main()
