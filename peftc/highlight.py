"""A Pygments lexer for `.peft` files: specs (adapter declarations) and method/rule files (passes/*.peft).

Registered as the entry point `pygments.lexers: peft`, so `pygmentize -l peft FILE` and Sphinx/MkDocs
highlight `.peft` code once peftc is installed. One lexer serves both languages: their keywords do not clash.
"""
from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, default, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

SPEC_KEYWORDS = ("adapter", "active", "import", "combine", "targets", "exclude", "layers", "save", "weights",
                 "merge", "at", "in", "parameters", "replicate")
METHOD_KEYWORDS = ("method", "rule", "prio", "param", "shared", "let", "const", "weight", "bias", "on", "when",
                   "else", "require", "dropout", "record", "peft", "config", "mergeable", "writes", "training",
                   "dense", "init", "saved", "if", "frozen", "dtype", "optional", "each_layer", "over", "rescale",
                   "as", "pattern", "values", "where", "and", "or", "not", "search", "omits", "bias_option",
                   "companion", "from", "tied", "follow", "default_targets", "of", "row_input")
TYPES = ("int", "float", "bool", "str", "number", "list")
CONSTANTS = ("true", "false", "none")

_STRING = r'"(?:[^"\\\n]|\\.)*"'
_REGEX = r"/(?:\\.|[^/\\\n])+/"
_NUMBER = r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?"


class PeftLexer(RegexLexer):
    """peftc's spec and method languages (`.peft`)."""

    name = "peft"
    aliases = ["peft", "peftc"]
    filenames = ["*.peft"]
    mimetypes = ["text/x-peft"]
    url = "https://pypi.org/project/peftc/"

    tokens = {
        "root": [
            (r"[ \t]+", Whitespace),
            (r"\n", Whitespace),
            (r"#[^\n]*", Comment.Single),
            (r"\b(targets|exclude)\b(?![ \t]*[=,)])", Keyword, "targets"),
            (rf"(\bat\b)([ \t]+)({_REGEX})", bygroups(Keyword, Whitespace, String.Regex)),
            (_STRING, String.Double),
            (r"all-linear\b", Name.Constant),
            (words(CONSTANTS, suffix=r"\b"), Keyword.Constant),
            (words(TYPES, suffix=r"\b"), Keyword.Type),
            (words(SPEC_KEYWORDS + METHOD_KEYWORDS, suffix=r"\b"), Keyword),
            (r"(?<=\bmethod)([ \t]+)([A-Za-z_]\w*)", bygroups(Whitespace, Name.Class)),
            (r"[A-Za-z_]\w*(?=\s*\()", Name.Function),
            (r"\?[A-Za-z_]\w*", Name.Variable),
            (r"[A-Za-z_][\w\-]*(?:\.[\w\-]+)*", Name),
            (_NUMBER, Number),
            (r"=>|==|!=|<=|>=|\*\*|//|\.\.\.|[-+*/%@<>=?:!]", Operator),
            (r"[{}()\[\],.]", Punctuation),
        ],
        "targets": [   # a target list: names, "strings", /regexes/, all-linear, up to the end of the line
            (r"[ \t]+", Whitespace),
            (r"#[^\n]*", Comment.Single),
            (_STRING, String.Double),
            (_REGEX, String.Regex),
            (r"all-linear\b", Name.Constant),
            (r"[A-Za-z0-9_][\w\-]*(?:\.[\w\-]+)*", Name),
            (r",", Punctuation),
            (r"\n", Whitespace, "#pop"),
            default("#pop"),
        ],
    }
