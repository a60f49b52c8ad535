"""The book's side of unitlib: the appendix's reported numbers (:mod:`~unitlib.book.paper`), its tables built from
the result records (:mod:`~unitlib.book.report`, :mod:`~unitlib.book.appendix`), seaborn figures
(:mod:`~unitlib.book.plots`, :mod:`~unitlib.book.gallery`), ipywidgets (:mod:`~unitlib.book.widgets`), the
coursework (:mod:`~unitlib.book.labs`) and the build (:mod:`~unitlib.book.build`, ``python -m unitlib.book``).

It uses the core through the public pipeline (:func:`unitlib.experiment.run`) and the records
(:mod:`unitlib.results`); the core never imports it. It needs the ``book`` extra: ``pip install 'unitlib[book]'``
(pandas, matplotlib, seaborn, ipywidgets and the Jupyter Book toolchain).
"""
