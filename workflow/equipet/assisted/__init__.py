"""The central slice, the SCNN/CNN-assisted reconstruction methods, their rod metrics and figures."""
