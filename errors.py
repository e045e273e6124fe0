"""hcgpt's errors: one family, so that train.py and every script end a user's mistake in one line.

Every problem a user can cause or meet (a config value, a file, the data, a checkpoint, the disk, the
network, the launch) is an HcgptError whose message names the problem and the fix; train.main and
every script print it as one line and exit with status 1 (common.run_cli). Anything else is a bug and
keeps its traceback. docs/errors.md is the catalogue of the messages.

    HcgptError              the base
    ConfigError             a config key, a flag, an input file or a run directory hcgpt cannot use
    NotFound                a file or directory that is not there (a FileNotFoundError)
    CheckpointError         a ckpt.pt that cannot be used (missing, damaged, another program's)
    WriteError              a run's file (log, checkpoint, results) could not be written; what is kept
    DistributedSetupError   torchrun's environment is incomplete, or the ranks did not all meet
    Diverged                a training step's loss or gradient norm is not finite
    FusedCheckError         the fused kernels are not safe to run on this device
"""


class HcgptError(Exception):
    """A problem with what hcgpt was given or met, said in one line with its fix."""


class ConfigError(HcgptError, ValueError):
    pass


class NotFound(HcgptError, FileNotFoundError):
    pass


class CheckpointError(HcgptError, ValueError):
    pass


class WriteError(HcgptError, OSError):
    pass


class DistributedSetupError(HcgptError, RuntimeError):
    pass


class Diverged(HcgptError, RuntimeError):
    pass


class FusedCheckError(HcgptError, RuntimeError):
    pass
