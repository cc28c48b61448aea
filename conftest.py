# The book's .py twins are chapter sources, not test modules, and _build holds executed copies.
collect_ignore_glob = ["book/*.py", "_build/*", "tools/*"]
