"""Experiments made of `solopo` commands: the quality experiment (`solopo experiment`), its config,
its resumable stage runner and its analysis (CIs, paired tests, cost). Sits above every other room:
it runs them as commands and reads their files."""
