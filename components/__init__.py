"""KFP components, one per stage (``kubedistill.components``).

``stages`` holds the ``@dsl.component`` wrappers; ``steps`` their bodies as plain functions;
``common`` config building, progress lines and artifact I/O; ``trainjob`` the multi-node
TrainJob; ``parent_run`` the MLflow parent run. Import ``kubedistill.components.stages`` for
the components (this package itself imports nothing, so a component running in a pod pays
only for what it uses).
"""
