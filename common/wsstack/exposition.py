"""Prometheus text exposition format 0.0.4, written by hand (no client library in the apps).

A family is rendered as its HELP and TYPE lines followed by all its samples, so a scraper
never sees one metric's samples split up. Label values are escaped as the format requires
(backslash, double quote, line feed); HELP text escapes backslash and line feed only.
"""
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list = field(default_factory=list)  # (labels dict, value)

    def add(self, value, **labels):
        self.samples.append((labels, value))


def escape_label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(families):
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            label_text = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels.items())
            lines.append(f"{family.name}{{{label_text}}} {value}" if label_text else f"{family.name} {value}")
    return "\n".join(lines) + "\n"
