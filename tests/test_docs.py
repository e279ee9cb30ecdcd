"""The documentation holds together: every relative link and #anchor of README.md and docs/*.md resolves (GitHub's
heading slugs), the README stays a front page (at most 260 lines) that links every docs page, and its test command is
the one CI runs (.ci/run)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]

FENCE = re.compile(r'^ {0,3}(```|~~~)')
HEADING = re.compile(r'^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$')
CODE_SPAN = re.compile(r'(`+)(.+?)\1')
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(<?([^)\s>]*)>?(?:\s+"[^"]*")?\)')
HTML_ANCHOR = re.compile(r'<a\s+(?:id|name)="([^"]+)"')


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '# comment' in a shell block is not a heading, nor a link)."""
    lines, fenced = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (code spans keep their content, links their text, emphasis
    goes), lowercased; every character other than a letter, a digit, '-', '_' or a space removed; spaces -> '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', text)
    text = re.sub(r'<[^>]+>', '', text)
    text = text.replace('*', '')
    return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-')


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers: its headings' slugs (a repeated slug gets -1, -2, ...) and explicit <a id/name>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f'{slug}-{n}')
    return found


def links(path: Path) -> list[str]:
    """The link targets of a page's prose (not inside code blocks or code spans)."""
    targets = []
    for line in prose_lines(path.read_text()):
        line = CODE_SPAN.sub('', line)
        targets += LINK.findall(line)
    return targets


def test_slugs_follow_githubs_rules():
    assert github_slug('Logit standardization (`--logit_stand`)') == 'logit-standardization---logit_stand'
    assert github_slug('TDD and TDD+CRD') == 'tdd-and-tddcrd'
    assert github_slug("RepDistiller's feature methods") == 'repdistillers-feature-methods'
    assert github_slug('torchrun / DistributedDataParallel') == 'torchrun--distributeddataparallel'
    assert github_slug('train_teacher.py, and the flags both CLIs share') == \
        'train_teacherpy-and-the-flags-both-clis-share'
    assert github_slug('MLKD and the `weak_strong` data mode') == 'mlkd-and-the-weak_strong-data-mode'


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / 'p.md'
    page.write_text('# A\n\n```bash\n# not a heading\n```\n\n## Cost\n\n### Cost\n\n## Cost\n')
    assert anchors(page) == {'a', 'cost', 'cost-1', 'cost-2'}


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.is_file()
    broken = []
    for target in links(page):
        if re.match(r'[a-z][a-z0-9+.-]*:', target, re.I):        # http:, https:, mailto: ... (not checked here)
            continue
        path, _, anchor = target.partition('#')
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f'{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}')
            continue
        if anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            broken.append(f'{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}')
    assert not broken, f'{page.relative_to(ROOT)}: ' + '; '.join(broken)


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / 'README.md').read_text()
    assert len(readme.splitlines()) <= 260
    linked = {t.partition('#')[0] for t in links(ROOT / 'README.md')}
    assert {f'docs/{p.name}' for p in PAGES[1:]} <= linked


def test_the_readmes_test_command_is_the_one_ci_runs():
    def commands(text: str) -> list[str]:
        return [line.split('#')[0].strip() for line in text.splitlines()
                if line.strip().startswith('python -m pytest')]
    readme = commands((ROOT / 'README.md').read_text())
    ci = commands((ROOT / '.ci' / 'run').read_text())
    assert len(ci) == 1 and readme and set(readme) == set(ci)
    assert ci == ['python -m pytest -q tests']
