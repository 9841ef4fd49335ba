"""Write README.md from nbs/index.ipynb (markdown cells as they are, code cells as python blocks).

Usage: python tools/make_readme.py [--check]   (--check: exit 1 if README.md is out of date)
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
nb = json.loads((root / 'nbs' / 'index.ipynb').read_text(encoding='utf-8'))
parts = []
for cell in nb['cells']:
    src = ''.join(cell['source']).strip('\n')
    if not src or src.startswith('#| hide'): continue
    parts.append(src if cell['cell_type'] == 'markdown' else f'```python\n{src}\n```')
text = '\n\n'.join(parts) + '\n'
readme = root / 'README.md'
if '--check' in sys.argv:
    if not readme.exists() or readme.read_text(encoding='utf-8') != text:
        sys.exit('README.md is out of date with nbs/index.ipynb: run python tools/make_readme.py')
    print('README.md matches nbs/index.ipynb')
else:
    readme.write_text(text, encoding='utf-8')
    print(f'wrote {readme}')
