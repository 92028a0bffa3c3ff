from asm_cli.main import main

main()
