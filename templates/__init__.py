"""Templates that ship with sftc (installed as `sftc.templates`): launch.sh.j2 renders a bundle's
launcher. templates/chat/ holds the demo's chat template: project data that specs name by path,
not package data."""
