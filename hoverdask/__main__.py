from hoverdask.cli import app

app(prog_name="hoverdask")
