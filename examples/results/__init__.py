"""The modules behind ``examples/make_results.py`` (which regenerates ``docs/results.md``).

- :mod:`.settings` — the paper's settings, our CPU configurations and the paper-protocol variants;
- :mod:`.runs` — running (and resuming) the base runs and the variants' gold standards;
- :mod:`.tables` — markdown tables and number formatting;
- :mod:`.findings` — the finding-by-finding check against the paper;
- :mod:`.markdown` — the document itself.
"""
