from setuptools import find_packages, setup

setup(
    name="guided-diffusion-rcdm",
    version="0.1.0",
    description=(
        "Representation-Conditioned Diffusion Models (RCDM): see what a "
        "self-supervised representation keeps by sampling images from it."
    ),
    license="MIT",
    # True floors, checked against the APIs used by tests/test_version_floors.py: X | Y unions
    # evaluated at import (3.10), torch.serialization.safe_globals (torch 2.5; torchvision 0.20 is
    # its release); timm 1.0.21 is the first whose ViTs can be built on the meta device (the
    # encoders take the file's tensors without a random init first).
    python_requires=">=3.10",
    packages=find_packages(include=["guided_diffusion_rcdm", "guided_diffusion_rcdm.*"]),
    # the quickstart's report page is a template file next to its module
    package_data={"guided_diffusion_rcdm.apps": ["*.html"]},
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "timm>=1.0.21",
        "numpy",
        "blobfile",
        "pillow",
        "tqdm",
    ],
    # `rcdm train|sample|interpolate|manipulate|eval|cache|quickstart|benchmark|explore`: the scripts' commands
    entry_points={"console_scripts": ["rcdm = guided_diffusion_rcdm.__main__:main"]},
    extras_require={
        "mpi": ["mpi4py"],
        "slurm": ["submitit"],
        "faiss": ["faiss-cpu"],
        "safetensors": ["safetensors"],
        # the offline quickstart trains on the photographs scikit-image ships
        "quickstart": ["scikit-image"],
        # encoders from Hugging Face transformers (hf:REPO_OR_DIR) and OpenCLIP (open_clip:ARCH)
        "hf": ["transformers"],
        "clip": ["open_clip_torch"],
        # `rcdm explore`: the interactive web app
        "app": ["gradio"],
        "test": ["pytest", "pytest-xdist", "scikit-image", "safetensors", "submitit", "transformers",
                 "open_clip_torch", "gradio", "playwright"],
        # `pip install .[mpi-test]`: mpi4py plus an MPI (mpich) with mpiexec, for the MPI launch test
        "mpi-test": ["mpi4py", "mpich"],
    },
)
