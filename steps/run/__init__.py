"""Run bookkeeping, apart from the data path: where work lives and who may touch it.

``files`` (shard I/O, atomic writes), ``resume`` (content-addressed keys and completion
markers), ``stages`` (each step as a resumable shard job), ``lease`` (one run per location),
``liveness`` (whether an owner still runs), ``work_gc`` (removing work no recent run used),
``faults`` (named kill points for the crash tests).
"""
