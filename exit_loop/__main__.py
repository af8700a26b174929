from exit_loop.cli import main
import sys
sys.exit(main())
