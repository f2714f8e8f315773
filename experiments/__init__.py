"""Paper experiments, one thin module each (`python -m experiments.<name>`)."""
