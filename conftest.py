# The book's .py twins are chapter sources, not test modules, and _build holds executed copies.
collect_ignore_glob = ["book/*.py", "_build/*", "tools/*"]


# The test run uses two workers (pytest-xdist, --dist loadfile: a notebook or test file runs whole on one worker,
# handed out in collection order, kept by --no-loadscope-reorder). The longest notebooks go first, so that the two
# workers finish together.
SLOW_FIRST = ["book/09_reproduction.ipynb", "book/05b_loss_floor.ipynb", "book/07_training.ipynb",
              "book/06b_augment.ipynb", "book/08_evaluation.ipynb", "book/07b_at_scale.ipynb"]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)  # stable: the cells of a notebook keep their order
