"""Renderings: tables, summary.json and self-contained HTML pages (``pages``), figures
(``figures``), the findings sentences (``findings``), neuron cards (``cards``), the view across a
sweep (``sweep``) and what analyze.py does as plain functions (``workflows``)."""
