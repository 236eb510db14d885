"""What every stage shares, torch-free and Dask-free: errors, atomic writes, the nuclei table
schema and the nucleus type tables. Imports nothing else of hoverdask."""
