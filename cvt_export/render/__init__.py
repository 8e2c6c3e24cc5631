"""Rendering: Markdown and plots made from what a command recorded, apart from the code that
measures it (issue #29 moves every renderer here; `deploy` is the first)."""
