"""The regression gate's result (`RegressResult`) as Markdown: the job summary a CI shows, with
the verdict, a table of what failed or changed, and the information lines."""

from __future__ import annotations

from cvt_export.records import RegressResult


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(result: RegressResult) -> str:
    lines = [f"## cvt-bench regress: {result.verdict}", "", f"Baseline `{result.baseline}`.", ""]
    if result.findings:
        lines += ["| | what | detail |", "|---|---|---|"]
        lines += [f"| {'FAIL' if f.kind == 'fail' else 'CHANGED'} | {_cell(f.what)} | {_cell(f.detail)} |"
                  for f in result.findings]
        if not result.updated:
            lines += ["", "If intended, run `cvt-bench regress --update` and commit the baseline."]
        lines.append("")
    lines += [f"- {_cell(line)}" for line in result.info]
    return "\n".join(lines) + "\n"
