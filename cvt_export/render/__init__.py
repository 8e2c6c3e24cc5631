"""Rendering: Markdown and plots made from what a command recorded, apart from the code that
measures it: the benchmark report, the recommendation, the profile, the accuracy pass, tune's
decisions, the regression gate's result and deploy's record, each fed its record (a test holds
that no Markdown or plot is made anywhere else)."""
