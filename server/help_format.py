"""Help text for the project's command-line tools (`qwen-vl-bench`, `qwen-vl-tiny-model`, ...)."""

from __future__ import annotations

import argparse
import copy


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, "(default: X)", unless its help already speaks of one
    or the default is "unset" (None, empty, a flag's off); keeps the description's line
    breaks."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default_shown(action):
            action = copy.copy(action)  # argparse prints no help line at all for help=None
            action.help = self._with_default(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return self._with_default(action) if self._default_shown(action) else action.help

    @staticmethod
    def _with_default(action: argparse.Action) -> str:
        default = action.default
        if isinstance(default, tuple) and action.metavar == "WxH":
            default = "x".join(map(str, default))
        shown = str(default).replace("%", "%%")
        return f"{(action.help or '').strip()} (default: {shown})".lstrip()

    @staticmethod
    def _default_shown(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and "default" not in (action.help or "").lower() \
            and default is not argparse.SUPPRESS and default is not None and default is not False \
            and default != "" and default != [] \
            and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                        argparse._StoreConstAction))
