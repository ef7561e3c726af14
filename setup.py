"""Package list for the one `kubedistill` distribution.

The runtime library lives in `runtime/kubedistill`; the KFP components and pipelines live in
the top-level `components/` and `pipelines/` folders (the product layout) and are installed as
`kubedistill.components` and `kubedistill.pipelines`. pyproject.toml cannot combine package
discovery with such a mapping, so the list is computed here.
"""

from setuptools import find_packages, setup

runtime = [p for p in find_packages("runtime") if p.startswith("kubedistill")]
setup(packages=runtime + ["kubedistill.components", "kubedistill.pipelines"])
