"""The command-line layer: flag declarations (`flags`), the error policy (`policy`), and the
commands over the library (`train`, `sample`, `evaluate`, `cache`). Core modules never import it.

The console command `rcdm` (`python -m guided_diffusion_rcdm`) and the scripts in scripts/ call
these commands' `main(argv)`.
"""
