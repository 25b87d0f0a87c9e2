"""The `asyncpool` command: demo, bench and doctor. Not imported by `import asyncpool`."""
