from edgemeta.cli import main

main(prog_name="edgemeta")
