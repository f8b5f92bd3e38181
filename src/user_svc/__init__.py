"""The user service: accounts, roles, login, and the JWT issuer every other service trusts."""
